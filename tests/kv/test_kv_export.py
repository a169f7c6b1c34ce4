"""KV-cache scales in both export layouts, read back independently of megaquant.

Reference: the keys and values the core attention received during calibration (captured by a
forward pre-hook on the unquantized model), whose max |x| / 448 (FP8) or / (6 * 448) (NVFP4
global scale) is the per-layer decode scale an engine must read (rtol 1e-6). The
compressed-tensors library parses the config's ``kv_cache_scheme``.
"""

import json

import pytest
import torch

from tests.export import reference_reader as R
from tests.kv.test_kv_quant import _capture_kv

SEQ = 16
NVFP4 = [{"modules": "*", "weight": {"format": "nvfp4"}, "input": {"format": "nvfp4"}}]


def _quantized(kv_format):
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    cfg = tiny_gpt_config()
    torch.manual_seed(0)
    model = build_gpt_model(cfg, tp_size=1)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (2, SEQ), generator=g) for _ in range(3)]
    seen = _capture_kv(model, calib)
    recipe = {"name": f"nvfp4_{kv_format}kv", "rules": NVFP4, "kv_cache": {"format": kv_format}}
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib"))
    want = {}
    for name, pairs in seen.items():
        i = int(name.split(".")[2])
        want[i] = [max(p[j].abs().max() for p in pairs).float() for j in (0, 1)]
    return model, cfg, want


def test_kv_export_fp8_scales_in_both_layouts(megatron_single, tmp_path):
    from megaquant.export import export_model

    model, cfg, want = _quantized("fp8")
    report = export_model(model, cfg, tmp_path / "x", dtype="bfloat16")
    assert set(report.layouts) == {"modelopt", "compressed-tensors"} and report.kv_cache == "fp8"
    mo, ct_dir = tmp_path / "x" / "modelopt", tmp_path / "x" / "compressed-tensors"
    hq = json.loads((mo / "hf_quant_config.json").read_text())["quantization"]
    assert hq["kv_cache_quant_algo"] == "FP8"
    assert json.loads((mo / "config.json").read_text())["quantization_config"][
        "kv_cache_quant_algo"] == "FP8"
    mo_t, ct_t = R.load_tensors(mo), R.load_tensors(ct_dir)
    for i, (k, v) in want.items():
        for name, amax in (("k_proj.k_scale", k), ("v_proj.v_scale", v)):
            t = mo_t[f"model.layers.{i}.self_attn.{name}"]
            assert t.dtype == torch.float32 and t.shape == ()
            torch.testing.assert_close(t, amax / 448, rtol=1e-6, atol=0)
        for name, amax in (("k_scale", k), ("v_scale", v)):
            t = ct_t[f"model.layers.{i}.self_attn.{name}"]
            assert t.dtype == torch.float32 and t.shape == (1,)
            torch.testing.assert_close(t, (amax / 448).reshape(1), rtol=1e-6, atol=0)
    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    kv = qc["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["dynamic"]) == (8, "float", "tensor",
                                                                             False)
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is a dev dependency")
    parsed = ct.quantization.QuantizationConfig.model_validate(qc)
    assert parsed.kv_cache_scheme.num_bits == 8 and parsed.kv_cache_scheme.type == "float"


def test_kv_export_nvfp4_kv_modelopt_only(megatron_single, tmp_path):
    from megaquant.export import export_model

    model, cfg, want = _quantized("nvfp4")
    report = export_model(model, cfg, tmp_path / "x", dtype="bfloat16")
    assert list(report.layouts) == ["modelopt"]
    assert "no nvfp4 KV cache" in report.skipped_layouts["compressed-tensors"]
    mo = tmp_path / "x" / "modelopt"
    assert json.loads((mo / "hf_quant_config.json").read_text())["quantization"][
        "kv_cache_quant_algo"] == "NVFP4"
    t = R.load_tensors(mo)
    for i, (k, v) in want.items():
        torch.testing.assert_close(t[f"model.layers.{i}.self_attn.k_proj.k_scale"], k / 2688,
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(t[f"model.layers.{i}.self_attn.v_proj.v_scale"], v / 2688,
                                   rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="compressed-tensors has no nvfp4 KV cache"):
        export_model(model, cfg, tmp_path / "y", layouts=["compressed-tensors"], dtype="bfloat16")


def test_kv_export_from_a_saved_checkpoint(megatron_single, tmp_path):
    """The K/V amax travels through a PTQ checkpoint (dist-ckpt) into export_checkpoint."""
    from megaquant.export import export_checkpoint
    from megaquant.megatron.checkpoint import save_checkpoint

    model, cfg, want = _quantized("fp8")
    recipe = {"name": "nvfp4_fp8kv", "rules": NVFP4, "kv_cache": {"format": "fp8"}}
    save_checkpoint(model, tmp_path / "ckpt", metadata={"recipe_config": recipe,
                                                        "arch": dict(vars(cfg))})
    report = export_checkpoint(tmp_path / "ckpt", tmp_path / "x", layouts=["modelopt"])
    assert report.kv_cache == "fp8"
    t = R.load_tensors(tmp_path / "x" / "modelopt")
    for i, (k, v) in want.items():
        torch.testing.assert_close(t[f"model.layers.{i}.self_attn.k_proj.k_scale"], k / 448,
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(t[f"model.layers.{i}.self_attn.v_proj.v_scale"], v / 448,
                                   rtol=1e-6, atol=0)
