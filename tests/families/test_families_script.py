"""A user's path for a supported family: scripts/ptq.py model=hf, then scripts/export.py.

Qwen3 (q/k norms, head_dim != hidden/heads) with a byte-level tokenizer: PTQ at TP=2 under
torchrun, export at TP=1, and the export is a Qwen3ForCausalLM directory with the source's engine
files whose logits in transformers equal those of the PTQ checkpoint's fake-quant model to 1e-5
(FP8 W8A8; see test_export_families.py). Also the reliability case c17: model.seq_length beyond
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


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_ptq_tp2_then_export_of_qwen3(tmp_path):
    hf = save_family("qwen3", tmp_path / "m")
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
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32
    assert config["rope_theta"] == hf.config.rope_parameters["rope_theta"]
    assert config["max_position_embeddings"] == hf.config.max_position_embeddings
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file(), f
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert report["family"] == "Qwen3ForCausalLM"
    assert report["lm_head"].startswith("untied, kept in float32"), report["lm_head"]
    # transformers on the export == the PTQ checkpoint's fake-quant model rebuilt here at TP=1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = loaded(tokens).logits
        ours = _checkpoint_model(tmp_path / "ptq" / "checkpoint")(tokens, torch.arange(16)[None], None)
    assert not torch.equal(theirs, hf(tokens).logits)  # quantized, not the source weights
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 * ours.abs().max().item())


def _checkpoint_model(checkpoint):
    from megaquant.megatron.checkpoint import read_metadata
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.ptq import load_quantized

    init_distributed()
    init_model_parallel(1, 1, 1)
    arch = GPTConfig.from_dict(read_metadata(checkpoint)["metadata"]["arch"])
    assert arch.qk_layernorm and arch.kv_channels == 32 and arch.hf_family == "qwen3"
    model = build_gpt_model(arch, tp_size=1)
    load_quantized(model, checkpoint)
    return model.eval()
