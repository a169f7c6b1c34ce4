"""The ``dtype`` of unquantized tensors: config.json states it, bytes follow it, readers agree.

compressed-tensors NVFP4/MX are written only in bfloat16 (the library decompresses them to
bfloat16, and transformers' first float32 forward would fail on the mismatch); float16 refuses a
tensor beyond its range by name; ``auto`` is the source model's training dtype.
"""

import json

import pytest
import torch

from tests.export import reference_reader as R
from tests.export.export_helpers import quantized_tiny


@pytest.fixture(scope="module")
def nvfp4_model(megatron_single):
    return quantized_tiny("nvfp4_w4a16", megatron_single.dp_group)


def test_export_dtype_sets_config_tensors_and_bits(nvfp4_model, tmp_path):
    from megaquant.export import export_model

    model, cfg = nvfp4_model
    f32 = export_model(model, cfg, tmp_path / "f32", layouts=["modelopt"], dtype="float32")
    bf16 = export_model(model, cfg, tmp_path / "bf16", dtype="bfloat16")
    assert sorted(bf16.layouts) == ["compressed-tensors", "modelopt"] and bf16.dtype == "bfloat16"
    unquantized = f32.params - f32.quantized_params
    # exactly 2 bytes fewer per unquantized parameter; the quantized linears are unchanged
    assert f32.layouts["modelopt"]["bytes"] - bf16.layouts["modelopt"]["bytes"] == 2 * unquantized
    assert f32.layouts["modelopt"]["quantized_bits_per_param"] == \
        bf16.layouts["modelopt"]["quantized_bits_per_param"]
    for layout in bf16.layouts:
        d = tmp_path / "bf16" / layout
        config = json.loads((d / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == "bfloat16"
        sd = R.load_tensors(d)
        emb = model.embedding.word_embeddings.weight.detach()
        assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
        assert torch.equal(sd["model.embed_tokens.weight"], emb.to(torch.bfloat16))
        assert sd["model.norm.weight"].dtype == sd["lm_head.weight"].dtype == torch.bfloat16
        # quantized tensors keep their layout's dtypes (float32 global scale)
        key = "weight_scale_2" if layout == "modelopt" else "weight_global_scale"
        assert sd[f"model.layers.0.mlp.down_proj.{key}"].dtype == torch.float32
    assert json.loads(
        (tmp_path / "f32" / "modelopt" / "config.json").read_text())["dtype"] == "float32"


def test_export_compressed_tensors_nvfp4_needs_bfloat16(nvfp4_model, tmp_path):
    from megaquant.export import export_model

    model, cfg = nvfp4_model  # params_dtype float32: auto = float32
    report = export_model(model, cfg, tmp_path / "auto")
    assert list(report.layouts) == ["modelopt"] and report.dtype == "float32"
    assert "only with dtype=bfloat16" in report.skipped_layouts["compressed-tensors"]
    with pytest.raises(ValueError, match="dtype=float16 cannot be written as .*compressed-tensors"
                                         ".*only with dtype=bfloat16"):
        export_model(model, cfg, tmp_path / "x", layouts=["compressed-tensors"], dtype="float16")
    with pytest.raises(ValueError, match="dtype='fp16' is not valid; choose one of"):
        export_model(model, cfg, tmp_path / "y", dtype="fp16")
    export_model(model, cfg, tmp_path / "src", source_dtype="bfloat16")  # auto follows the source
    assert json.loads((tmp_path / "src" / "export_report.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto", "src"]


def test_export_float16_refuses_a_tensor_beyond_its_range(megatron_single, tmp_path):
    from megaquant.export import export_model

    model, cfg = quantized_tiny("fp8", megatron_single.dp_group)
    with torch.no_grad():
        model.decoder.final_layernorm.weight[3] = 70000.0  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="model.norm.weight holds values up to 70000.*beyond "
                                         "float16's 65504.*dtype=bfloat16 or float32"):
        export_model(model, cfg, tmp_path / "x", dtype="float16")
    assert list(tmp_path.iterdir()) == []
    report = export_model(model, cfg, tmp_path / "ok", dtype="bfloat16")
    assert report.dtype == "bfloat16"


def test_source_dtype_is_the_training_dtype(tmp_path):
    from megaquant.jobs.common import source_dtype
    from megaquant.models.gpt import tiny_gpt_config

    arch = tiny_gpt_config()
    assert source_dtype({"source": "smollm2"}, arch) == "bfloat16"
    assert source_dtype({"source": "random"}, arch) == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert source_dtype({"source": "hf", "path": str(tmp_path)}, arch) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "torch_dtype": "x"}))
    assert source_dtype({"source": "hf", "path": str(tmp_path)}, arch) == "bfloat16"
