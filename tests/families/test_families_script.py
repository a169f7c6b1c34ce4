"""A user's path for a supported family: scripts/ptq.py model=hf, then scripts/export.py.

Qwen3 (q/k norms, head_dim != hidden/heads; Qwen2's biases and Mixtral at EP=2 in the slow set)
with a byte-level tokenizer: PTQ at TP=2 under torchrun, export at TP=1, and the export is a
directory of the same architecture with the source's engine files whose logits in transformers
equal those of the PTQ checkpoint's fake-quant model to 1e-5 (FP8 W8A8; see
test_export_families.py). Also the reliability case c17: model.seq_length beyond
max_position_embeddings is refused by name.
"""

import json

import pytest
import torch

from tests.distributed_utils import run_script
from tests.families.families import add_tokenizer, save_family

transformers = pytest.importorskip("transformers")


def test_model_source_refuses_seq_length_beyond_max_positions(tmp_path):
    """What scripts/ptq.py model=hf does first (load_model_source), with its default seq_length."""
    from megaquant.jobs.common import load_model_source

    save_family("qwen3", tmp_path / "m")
    add_tokenizer(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["max_position_embeddings"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.seq_length=512 exceeds the model's "
                                         "max_position_embeddings=32"):
        load_model_source({"source": "hf", "path": str(tmp_path / "m"), "seq_length": 512})
    assert load_model_source({"source": "hf", "path": str(tmp_path / "m"), "seq_length": 32}).arch


ARCH_OF = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["qwen3", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_ptq_tp2_then_export(tmp_path, family):
    """q/k norms and head_dim (Qwen3), fused q/k/v biases sharded over TP (Qwen2) through the
    distributed checkpoint and the export."""
    hf = save_family(family, tmp_path / "m")
    add_tokenizer(tmp_path / "m")
    r = run_script("ptq.py", ["+recipe=fp8", "model=hf", f"model.path={tmp_path / 'm'}",
                              "model.seq_length=32", "parallel.tp=2", "data.calib_samples=4",
                              "data.eval_samples=4", f"run.output_dir={tmp_path / 'ptq'}"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("export.py", [f"checkpoint={tmp_path / 'ptq' / 'checkpoint'}",
                                 f"output_dir={tmp_path / 'x'}", "layouts=[compressed-tensors]"])
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "x" / "compressed-tensors"
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == [ARCH_OF[family]]
    c = hf.config
    assert config["head_dim"] == (getattr(c, "head_dim", None)
                                  or c.hidden_size // c.num_attention_heads)
    assert config["rope_scaling"] is None
    assert config["rope_theta"] == hf.config.rope_parameters["rope_theta"]
    assert config["max_position_embeddings"] == hf.config.max_position_embeddings
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file(), f
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert report["family"] == ARCH_OF[family]
    assert report["lm_head"].startswith("untied, kept in float32"), report["lm_head"]
    # transformers on the export == the PTQ checkpoint's fake-quant model rebuilt here at TP=1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = loaded(tokens).logits
        model = _checkpoint_model(tmp_path / "ptq" / "checkpoint", family)
        ours = model(tokens, torch.arange(16)[None], None)
    assert not torch.equal(theirs, hf(tokens).logits)  # quantized, not the source weights
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 * ours.abs().max().item())


def _checkpoint_model(checkpoint, family="qwen3"):
    from megaquant.megatron.checkpoint import read_metadata
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.ptq import load_quantized

    init_distributed()
    init_model_parallel(1, 1, 1)
    arch = GPTConfig.from_dict(read_metadata(checkpoint)["metadata"]["arch"])
    assert arch.hf_family == family
    model = build_gpt_model(arch, tp_size=1)
    load_quantized(model, checkpoint)
    return model.eval()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ptq_ep2_then_export_of_mixtral(tmp_path):
    """Mixtral's experts over 2 EP ranks in scripts/ptq.py, exported at EP=1 under Mixtral's names;
    decoded with compressed-tensors and loaded by transformers, it computes the checkpoint's
    weight-quantized model (activation quantization off, see test_export_families.py)."""
    from safetensors.torch import save_file

    from tests.families.test_export_families import decompress_with_compressed_tensors

    save_family("mixtral", tmp_path / "m")
    add_tokenizer(tmp_path / "m")
    r = run_script("ptq.py", ["+recipe=fp8", "model=hf", f"model.path={tmp_path / 'm'}",
                              "model.seq_length=32", "parallel.ep=2", "data.micro_batch=2",
                              "data.calib_samples=4", "data.eval_samples=4",
                              f"run.output_dir={tmp_path / 'ptq'}"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("export.py", [f"checkpoint={tmp_path / 'ptq' / 'checkpoint'}",
                                 f"output_dir={tmp_path / 'x'}", "layouts=[compressed-tensors]"])
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "x" / "compressed-tensors"
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    plain = decompress_with_compressed_tensors(d, config.pop("quantization_config"))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in plain
    (tmp_path / "hf").mkdir()
    save_file(plain, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    model = _checkpoint_model(tmp_path / "ptq" / "checkpoint", family="mixtral")
    for m in model.modules():
        if getattr(m, "input_quantizer", None) is not None:
            m.input_quantizer.mode = "off"
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = loaded(tokens).logits
        ours = model(tokens, torch.arange(16)[None], None)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 * ours.abs().max().item())
