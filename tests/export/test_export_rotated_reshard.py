"""A rotated PTQ checkpoint reshards and exports like any other.

``nvfp4_mrgptq`` (residual rotation R1, which unties the tied embedding; online block Hadamard
16 on down_proj; sequential act-order GPTQ; four-over-six scales) on the tiny GPT, calibrated
once at TP=1 and once at TP=2 from the same weights, each saved as a PTQ checkpoint:

* the TP=2 checkpoint loaded into a fresh *tied* TP=1 model (restore unties it and installs the
  transform, dist-ckpt gathers the shards) gives the TP=2 model's logits, and the TP=1
  checkpoint loaded at TP=2 gives the TP=1 model's logits (same weights, other GEMM shapes:
  1e-5 relative);
* the export of the TP=2 checkpoint is byte-identical to the export of the TP=1 checkpoint
  (config.json with its ``transform_config``, packed NVFP4 weights, scales, the untied lm_head),
  as for the plain recipes in test_export_tp_invariance.py. The TP=2 run adopts the TP=1
  activation amax there (last-bit differences of different GEMM shapes); the GPTQ weights need
  no such help on this model (measured: identical).
"""

from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed_utils import run_ranks
from tests.export.export_helpers import batches
from tests.sharding import tiny_full_state

RECIPE = "nvfp4_mrgptq"


@torch.no_grad()
def _logits(model, tp_group) -> torch.Tensor:
    """Full-vocabulary logits on fixed tokens (vocab shards all-gathered over TP)."""
    from megaquant.calib.capture import all_gather_cat

    tokens = batches(1, 5)[0]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return all_gather_cat(model(tokens, pos, None), tp_group, dim=-1)


def _input_amax(model) -> dict:
    return {n: m.amax.clone() for n, m in model.named_modules()
            if n.endswith("input_quantizer") and m.is_enabled}


def _tied(tp: int):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    model = build_gpt_model(tiny_gpt_config(tie_embeddings=True), tp_size=tp)
    assert model.share_embeddings_and_output_weights
    return model


def _quantize_and_save(groups, tp, full, ckpt, input_amax=None):
    """Calibrate at ``tp`` from ``full``, save the PTQ checkpoint; (logits, input amax)."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.models.gpt import tiny_gpt_config
    from megaquant.recipe import RECIPE_DIR
    from tests.sharding import shard_state_dict

    model = _tied(tp)
    shard_state_dict(model, full, groups.tp_rank, tp)
    calib = [b[:, :-1] for b in batches(3, 1)]
    megaquant.quantize(model, RECIPE, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group)
    for name, m in model.named_modules():
        if input_amax is not None and name in input_amax:
            m.load_amax(input_amax[name])
    meta = {"recipe_config": yaml.safe_load((RECIPE_DIR / f"{RECIPE}.yaml").read_text()),
            "arch": dict(vars(tiny_gpt_config(tie_embeddings=True)))}
    save_checkpoint(model, ckpt, metadata=meta)
    return _logits(model, groups.tp_group), _input_amax(model)


def _loaded_logits(groups, tp, ckpt) -> torch.Tensor:
    """Logits of ``ckpt`` loaded into a fresh tied model at ``tp`` (resharded by dist-ckpt)."""
    from megaquant.ptq import load_quantized

    model = _tied(tp)
    load_quantized(model, ckpt)
    assert not model.share_embeddings_and_output_weights  # untied by restore
    return _logits(model, groups.tp_group)


def _tp2(full, ckpt2, ckpt1, input_amax):
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=120)
    groups = init_model_parallel(tp=2)
    logits, _ = _quantize_and_save(groups, 2, full, ckpt2, input_amax)
    return {"logits": logits, "tp1_at_tp2": _loaded_logits(groups, 2, ckpt1)}


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _close(got, want, what):
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-5, f"{what}: max relative difference {rel:.2e}"


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_rotated_checkpoint_reshards_and_exports_as_at_tp1(megatron_single, tmp_path):
    from megaquant.export import export_checkpoint

    full = tiny_full_state(rotatable=True)
    ckpt1, ckpt2 = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    logits1, amax = _quantize_and_save(megatron_single, 1, full, ckpt1)
    res = run_ranks(_tp2, 2, (full, ckpt2, ckpt1, amax), timeout_s=420)
    for rank, r in enumerate(res):
        _close(r["logits"], logits1, f"TP=2 run, rank {rank}, vs TP=1 run")
        _close(r["tp1_at_tp2"], logits1, f"TP=1 checkpoint loaded at TP=2, rank {rank}")
    _close(_loaded_logits(megatron_single, 1, ckpt2), res[0]["logits"],
           "TP=2 checkpoint loaded at TP=1")

    reports = [export_checkpoint(c, tmp_path / f"out_{i}", dtype="bfloat16")
               for i, c in enumerate((ckpt1, ckpt2))]
    assert all(r.untied and sorted(r.layouts) == ["compressed-tensors"] for r in reports)
    one, two = _files(tmp_path / "out_0"), _files(tmp_path / "out_1")
    assert one.keys() == two.keys() and len(one) >= 3, sorted(one)
    config = yaml.safe_load(one["compressed-tensors/config.json"])  # JSON is YAML
    assert config["quantization_config"]["transform_config"]["config_groups"]
    for name in one:
        assert one[name] == two[name], f"{name} differs between the TP=1 and TP=2 exports"
