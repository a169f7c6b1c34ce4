"""Mixed-precision exports: layers in different schemes, in both layouts.

The tiny GPT with layer 0 in NVFP4 (its fc2 left unquantized) and layer 1 in FP8. References:
the weights the fake-quantized model multiplies with, decoded from the files by the independent
reader (tests/export/reference_reader.py, float32: rtol 2^-22 for the reciprocal NVFP4 global
scale of compressed-tensors, exact otherwise) and by the ``compressed-tensors`` library itself
(bfloat16 inside for NVFP4: bfloat16 tolerance).
"""

import json

import pytest
import torch

from tests.export import reference_reader as R
from tests.export.export_helpers import batches, fake_quant_hf_state

MIXED = {
    "version": 3, "name": "mixed_export",
    "rules": [
        {"modules": "*", "weight": {"format": "fp8"}, "input": {"format": "fp8"}},
        {"modules": "decoder.layers.0.*", "weight": {"format": "nvfp4"},
         "input": {"format": "nvfp4"}},
        {"modules": "decoder.layers.0.mlp.linear_fc2", "weight": None, "input": None},
    ],
}
ALGO = {0: "NVFP4", 1: "FP8"}


@pytest.fixture(scope="module")
def exported(megatron_single, tmp_path_factory):
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.export import export_model
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    cfg = tiny_gpt_config()
    torch.manual_seed(0)
    model = build_gpt_model(cfg, tp_size=1)
    calib = [b[:, :-1] for b in batches(3, 1)]
    megaquant.quantize(model, MIXED, lambda m: run_forward(m, calib, "c", megatron_single.dp_group),
                       dp_group=megatron_single.dp_group)
    out = tmp_path_factory.mktemp("mixed") / "x"
    report = export_model(model, cfg, out, dtype="bfloat16")
    return {"dir": out, "report": report, "ref": fake_quant_hf_state(model, cfg)}


def _quantized(ref):
    mods = sorted(k[:-len(".weight")] for k in ref
                  if ".layers." in k and k.endswith("_proj.weight"))
    return [m for m in mods if m != "model.layers.0.mlp.down_proj"]


def test_mixed_export_writes_both_layouts(exported):
    assert exported["report"].scheme == "fp8+nvfp4"
    assert sorted(exported["report"].layouts) == ["compressed-tensors", "modelopt"]


def test_mixed_export_modelopt_quantized_layers_decode(exported):
    d = exported["dir"] / "modelopt"
    quant = json.loads((d / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "MIXED_PRECISION"
    assert "model.layers.0.mlp.down_proj" in quant["exclude_modules"]
    config = json.loads((d / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quantized_layers"] == quant[
        "quantized_layers"]
    sd = R.load_tensors(d)
    ref = exported["ref"]
    mods = _quantized(ref)
    assert sorted(quant["quantized_layers"]) == mods
    for m in mods:
        layer = int(m.split(".")[2])
        entry = quant["quantized_layers"][m]
        assert entry["quant_algo"] == ALGO[layer], m
        assert entry.get("group_size") == (16 if layer == 0 else None)
        got = R.modelopt_weight(sd, m, entry["quant_algo"], ref[f"{m}.weight"].shape)
        assert torch.equal(got, ref[f"{m}.weight"]), m
    assert sd["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


def _ct_groups(d):
    config = json.loads((d / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision" and len(config["config_groups"]) == 2
    owner = {t: g for g in config["config_groups"].values() for t in g["targets"]}
    return config, owner


def test_mixed_export_compressed_tensors_groups_decode(exported):
    d = exported["dir"] / "compressed-tensors"
    config, owner = _ct_groups(d)
    ref, sd = exported["ref"], R.load_tensors(d)
    assert sorted(owner) == _quantized(ref)
    assert "model.layers.0.mlp.down_proj" in config["ignore"]
    for m, group in owner.items():
        assert group["format"] == ("nvfp4-pack-quantized" if ".layers.0." in m else
                                   "float-quantized"), m
        got = R.ct_weight(sd, m, group, ref[f"{m}.weight"].shape)
        torch.testing.assert_close(got, ref[f"{m}.weight"], rtol=2**-22, atol=0, msg=m)


def test_mixed_export_compressed_tensors_library_reads_it(exported):
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is a dev dependency")
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    d = exported["dir"] / "compressed-tensors"
    config, owner = _ct_groups(d)
    qc = QuantizationConfig.model_validate(config)
    assert qc.format == ct.CompressionFormat.mixed_precision.value
    ref, sd = exported["ref"], R.load_tensors(d)
    for name, scheme in qc.config_groups.items():
        compressor = BaseCompressor.load_from_registry(scheme.format)
        for m in scheme.targets:
            local = {k[len(m) + 1:]: v for k, v in sd.items() if k.startswith(m + ".")}
            w = compressor.decompress(local, scheme)["weight"].float()
            want = ref[f"{m}.weight"]
            tol = 2**-7 if scheme.format.startswith("nvfp4") else 2**-22
            torch.testing.assert_close(w, want, rtol=tol, atol=tol * want.abs().max().item(),
                                       msg=m)
