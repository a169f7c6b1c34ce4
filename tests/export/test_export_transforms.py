"""Exports of rotated models: plain NVFP4 tensors, an untied lm_head, and the online transform
written as compressed-tensors' ``transform_config`` (refused in the ModelOpt layout).

Reference for the logits: the fake-quant model. The export is rebuilt independently (reference
reader for the tensors, a fresh model with a plain ``nvfp4`` recipe, i.e. no megaquant
transform), and each transformed module's input transform is *compressed-tensors' own*
``HadamardTransform`` built from the exported ``transform_config``. The compressed-tensors NVFP4
layout decodes with the reciprocal global scale (2 ulp, see test_export_roundtrip.py), and the
transform runs in float32 in another order: compared at 1e-4 relative on the logits.
``nvfp4_rot`` and ``int4_rot_gptq`` (offline rotations only) are rebuilt the same way.
``mxfp4_mrgptq`` (online transform) is written through the MXFP4 exporter in compressed-tensors
with its transform_config; ModelOpt refuses it as it refuses every online transform.

Since issue-21 compressed-tensors writes NVFP4/MX only with ``dtype=bfloat16`` (its readers
decompress to bfloat16): the models are rounded to bfloat16 after quantization (lossless, so
the fake-quant model is exactly what is exported) and exported with ``dtype="bfloat16"``.
"""

import dataclasses
import json

import pytest
import torch
import yaml

from tests.export import reference_reader as R
from tests.export.export_helpers import (
    batches,
    fake_quant_hf_state,
    quantized_tiny,
    round_params_to_bf16,
)

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is a dev dependency")
RECIPE = "nvfp4_mrgptq"
HF_TO_MEGATRON = {"q_proj": "self_attention.linear_qkv", "k_proj": "self_attention.linear_qkv",
                  "v_proj": "self_attention.linear_qkv", "o_proj": "self_attention.linear_proj",
                  "gate_proj": "mlp.linear_fc1", "up_proj": "mlp.linear_fc1",
                  "down_proj": "mlp.linear_fc2"}


@pytest.fixture(scope="module")
def exported(megatron_single, tmp_path_factory):
    from megaquant.export import export_model

    model, cfg = quantized_tiny(RECIPE, megatron_single.dp_group, tie_embeddings=True)
    round_params_to_bf16(model)  # compressed-tensors NVFP4 is written in bfloat16 only: lossless
    d = tmp_path_factory.mktemp("mr") / "export"
    report = export_model(model, cfg, d, dtype="bfloat16")
    return model, cfg, d, report


def _ct_transform(group: dict):
    """compressed-tensors' own input transform for one transform_config group."""
    from compressed_tensors.transform import TransformConfig
    from compressed_tensors.transform.factory.base import TransformFactory

    scheme = TransformConfig.model_validate({"config_groups": {"g": group}}).config_groups["g"]
    factory = TransformFactory.from_scheme(scheme, name="g")
    probe = torch.nn.Linear(64, 64, bias=False)  # only its type and input width are read
    return factory.create_transform(probe, scheme.apply[0])


@torch.no_grad()
def _rebuild_from_ct(model, cfg, ct_dir, qc, plain_recipe: str):
    """A fresh untied model holding the compressed-tensors export's weights, decoded by the
    reference reader, quantized with the plain ``plain_recipe`` (no megaquant transform)."""
    from megaquant.models.gpt import build_gpt_model
    from megaquant.models.mapping import hf_to_megatron
    from megaquant.ptq import restore

    sd = R.load_tensors(ct_dir)
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    shapes = {k: v.shape for k, v in fake_quant_hf_state(model, untied).items()}
    hf = {k: v for k, v in sd.items() if k.endswith(".weight") and v.is_floating_point()}
    for m in {k.rsplit(".", 1)[0] for k in sd if k.endswith("weight_packed")}:
        hf[f"{m}.weight"] = R.ct_weight(sd, m, qc["config_groups"]["group_0"],
                                        shapes[f"{m}.weight"])
    rebuilt = build_gpt_model(untied, tp_size=1)
    restore(rebuilt, plain_recipe)
    rebuilt.load_state_dict(hf_to_megatron(hf, untied, 0, 1), strict=False)
    return sd, rebuilt


def _logits_error(model, rebuilt) -> float:
    """Relative max logit error of ``rebuilt`` (weights already dequantized: weight quantizers
    off; activation quantizers with the calibrated scales) against the fake-quant ``model``."""
    src = dict(model.named_modules())
    for name, layer in rebuilt.named_modules():
        if hasattr(layer, "weight_quantizer"):
            layer.weight_quantizer.configure(None, "off")
            if layer.input_quantizer.is_enabled:
                layer.input_quantizer.load_amax(src[name].input_quantizer.amax)
    tokens = batches(1, 5)[0]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    want, got = model(tokens, pos, None), rebuilt(tokens, pos, None)
    return float((got - want).abs().max() / want.abs().max())


def test_rotated_export_rebuilt_with_compressed_tensors_transforms_gives_fake_quant_logits(
        exported, megatron_single):
    model, cfg, d, report = exported
    assert report.untied and sorted(report.layouts) == ["compressed-tensors"]
    assert "block Hadamard" in report.skipped_layouts["modelopt"]
    config = json.loads((d / "compressed-tensors" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    qc = config["quantization_config"]
    groups = qc["transform_config"]["config_groups"]
    (group,) = groups.values()
    assert group["head_dim"] == 16 and group["apply"][0]["location"] == "input"
    assert sorted(group["apply"][0]["targets"]) == [f"model.layers.{i}.mlp.down_proj"
                                                    for i in range(cfg.num_layers)]
    # plain NVFP4: no megaquant transform, no untying
    sd, rebuilt = _rebuild_from_ct(model, cfg, d / "compressed-tensors", qc, "nvfp4")
    assert "lm_head.weight" in sd
    transform = _ct_transform(group)
    for name, layer in rebuilt.named_modules():
        if name.endswith("linear_fc2"):
            layer.input_transform = transform.forward  # a plain callable (see nn/local.py)
    assert _logits_error(model, rebuilt) < 1e-4


def test_modelopt_layout_refuses_an_online_transform(exported, tmp_path):
    from megaquant.export import export_model

    model, cfg, _, _ = exported
    with pytest.raises(ValueError, match="'modelopt' refused.*block Hadamard.*down_proj"):
        export_model(model, cfg, tmp_path / "m", layouts=["modelopt"])


@torch.no_grad()
def test_rotated_checkpoint_reloads_untied_with_its_transform(exported, tmp_path):
    """A rotated, tied model's checkpoint loads into a freshly built *tied* model: restore
    unties it and installs the online transform from the recipe; logits equal exactly."""
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.models.gpt import build_gpt_model
    from megaquant.ptq import load_quantized
    from megaquant.recipe import RECIPE_DIR

    model, cfg, _, _ = exported
    recipe = yaml.safe_load((RECIPE_DIR / f"{RECIPE}.yaml").read_text())  # what a PTQ job stores
    save_checkpoint(model, tmp_path / "ckpt", metadata={"recipe_config": recipe})
    fresh = build_gpt_model(cfg, tp_size=1)
    assert fresh.share_embeddings_and_output_weights
    load_quantized(fresh, tmp_path / "ckpt")
    assert not fresh.share_embeddings_and_output_weights
    tokens = batches(1, 6)[0]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    assert torch.equal(fresh(tokens, pos, None), model(tokens, pos, None))


@torch.no_grad()
@pytest.mark.parametrize("recipe,arch", [
    ("nvfp4_rot", {}), ("int4_rot_gptq", {"hidden_size": 128, "ffn_hidden_size": 256})])
def test_rotated_exports_without_online_transform_give_fake_quant_logits(recipe, arch,
                                                                        megatron_single, tmp_path):
    """Offline rotations need nothing in the export: every layout is written (ModelOpt too: NVFP4,
    and INT4 W4A16 since issue-21), untied, and the rebuilt compressed-tensors export gives the
    fake-quant logits."""
    from megaquant.export import export_model

    model, cfg = quantized_tiny(recipe, megatron_single.dp_group, tie_embeddings=True, **arch)
    round_params_to_bf16(model)  # compressed-tensors NVFP4 is written in bfloat16 only: lossless
    report = export_model(model, cfg, tmp_path / "x", dtype="bfloat16")
    assert report.untied and not report.online_transforms
    assert sorted(report.layouts) == ["compressed-tensors", "modelopt"]
    d = tmp_path / "x" / "compressed-tensors"
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["transform_config"] == {}
    plain = "nvfp4" if recipe.startswith("nvfp4") else "int4_w4a16"
    _, rebuilt = _rebuild_from_ct(model, cfg, d, qc, plain)
    assert _logits_error(model, rebuilt) < 1e-4


def test_online_transform_only_modelopt_possible_is_refused_not_written_empty(exported, tmp_path):
    """float32 NVFP4: compressed-tensors cannot write it and ModelOpt cannot say the transform;
    ``layouts=auto`` refuses (naming the transform) instead of writing no layout."""
    from megaquant.export import export_model

    model, cfg, _, _ = exported
    with pytest.raises(ValueError, match="'modelopt' refused.*block Hadamard"):
        export_model(model, cfg, tmp_path / "f32", dtype="float32")
    assert not (tmp_path / "f32").exists()


def test_mxfp4_mrgptq_exports_compressed_tensors_with_transform_and_refuses_modelopt(
        megatron_single, tmp_path):
    from megaquant.export import export_model

    model, cfg = quantized_tiny("mxfp4_mrgptq", megatron_single.dp_group, tie_embeddings=True)
    round_params_to_bf16(model)
    report = export_model(model, cfg, tmp_path / "x", dtype="bfloat16")
    assert report.scheme == "mxfp4" and sorted(report.layouts) == ["compressed-tensors"]
    assert "block Hadamard" in report.skipped_layouts["modelopt"]
    config = json.loads((tmp_path / "x" / "compressed-tensors" / "config.json").read_text())
    (group,) = config["quantization_config"]["transform_config"]["config_groups"].values()
    assert group["head_dim"] == 32 and sorted(group["apply"][0]["targets"]) == [
        f"model.layers.{i}.mlp.down_proj" for i in range(cfg.num_layers)]
    with pytest.raises(ValueError, match="'modelopt' refused.*block Hadamard.*down_proj"):
        export_model(model, cfg, tmp_path / "m", layouts=["modelopt"], dtype="bfloat16")


def test_int8_sq_had_exports_compressed_tensors_with_its_block_256_transform(megatron_single,
                                                                            tmp_path):
    """INT8 W8A8 with an online block Hadamard of 256 on down_proj: compressed-tensors only,
    with the transform (ModelOpt refuses it)."""
    from megaquant.export import export_model

    model, cfg = quantized_tiny("int8_sq_had", megatron_single.dp_group, ffn_hidden_size=256)
    report = export_model(model, cfg, tmp_path / "x", dtype="bfloat16")
    assert sorted(report.layouts) == ["compressed-tensors"]
    assert "block Hadamard" in report.skipped_layouts["modelopt"]
    config = json.loads((tmp_path / "x" / "compressed-tensors" / "config.json").read_text())
    (group,) = config["quantization_config"]["transform_config"]["config_groups"].values()
    assert group["head_dim"] == 256 and sorted(group["apply"][0]["targets"]) == [
        f"model.layers.{i}.mlp.down_proj" for i in range(cfg.num_layers)]
