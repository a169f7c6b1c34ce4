"""Tensor parallelism on CPU/gloo against the single-process (TP=1) model.

The TP=1 model is the reference. Its full weights are sharded by hand (contiguous chunks along
the split dimension; SwiGLU's fc1 split as [gate_r; up_r], as Megatron lays it out) into the
TP=2 model, or moved through a checkpoint, and logits and loss must agree to float32 rounding:
the only difference is the order of the sums in the row-parallel all-reduce.
"""

import pytest
import torch
import torch.distributed as dist

from tests.distributed_utils import run_ranks
from tests.sharding import shard_state_dict

ATOL = 1e-5  # logits ~ O(1) in float32; observed differences ~2e-7 (sum order in all-reduce)
LOSS_TOL = 1e-6  # nats per token; observed ~2e-8
SEQ, BATCH = 16, 2


def _tokens(n_batches=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (BATCH, SEQ + 1), generator=g) for _ in range(n_batches)]


def _full_logits(model, tokens, tp_group):
    """Logits over the whole vocabulary (GPTModel returns this TP rank's vocab slice)."""
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        local = model.eval()(tokens, pos, None)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _reference_nll(logits, labels):
    return torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), labels.flatten(),
                                             reduction="sum").item()


def _tp_worker():
    from megaquant.evaluate import evaluate_loss
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    init_distributed(timeout_s=60)
    cfg, batches = tiny_gpt_config(), _tokens()
    g1 = init_model_parallel(tp=1, seed=7)  # two DP ranks with identical models
    ref = build_gpt_model(cfg)
    ref_logits = [_full_logits(ref, b[:, :-1], g1.tp_group) for b in batches]
    nll = sum(_reference_nll(lg, b[:, 1:]) for lg, b in zip(ref_logits, batches))
    out = {"ref_loss": nll / (len(batches) * BATCH * SEQ),
           "dp_loss": evaluate_loss(ref, batches, g1.dp_group)}
    full_state = {k: v.clone() for k, v in ref.state_dict().items()
                  if isinstance(v, torch.Tensor)}
    for sp in (False, True):
        # other seed: weights must come from shard_state_dict
        g2 = init_model_parallel(tp=2, seed=99)
        model = build_gpt_model(cfg, sequence_parallel=sp)
        shard_state_dict(model, full_state, g2.tp_rank, 2)
        diff = max((_full_logits(model, b[:, :-1], g2.tp_group) - r).abs().max().item()
                   for b, r in zip(batches, ref_logits))
        out[f"logit_diff_sp{int(sp)}"] = diff
        out[f"tp2_loss_sp{int(sp)}"] = evaluate_loss(model, batches, g2.dp_group)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_tp2_and_sequence_parallel_match_tp1(parallel_results):
    results = [r["tp"] for r in parallel_results]
    for r in results:
        assert abs(r["dp_loss"] - r["ref_loss"]) < LOSS_TOL, r  # DP split + reduce of the loss
        for sp in (0, 1):
            assert r[f"logit_diff_sp{sp}"] < ATOL, r
            assert abs(r[f"tp2_loss_sp{sp}"] - r["ref_loss"]) < LOSS_TOL, r
    assert results[0]["dp_loss"] == results[1]["dp_loss"]  # every rank returns the same number


def _checkpoint_worker(directory):
    from megaquant.megatron.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    init_distributed(timeout_s=60)
    cfg, tokens = tiny_gpt_config(), _tokens(1)[0][:, :-1]
    g2 = init_model_parallel(tp=2, seed=3)
    first = build_gpt_model(cfg)
    save_checkpoint(first, directory, metadata={"recipe": "first"})
    torch.manual_seed(11)
    tp2 = build_gpt_model(cfg)  # different weights; saving it over `first` must replace them
    saved_logits = _full_logits(tp2, tokens, g2.tp_group)
    save_checkpoint(tp2, directory, metadata={"recipe": "test", "step": 1})
    crashed = _crash_during_save(build_gpt_model(cfg), directory, save_checkpoint)
    g1 = init_model_parallel(tp=1, seed=5)
    tp1 = build_gpt_model(cfg)
    before = (_full_logits(tp1, tokens, g1.tp_group) - saved_logits).abs().max().item()
    meta = load_checkpoint(tp1, directory)
    after = (_full_logits(tp1, tokens, g1.tp_group) - saved_logits).abs().max().item()
    return {"meta": meta, "record": read_metadata(directory), "before": before, "after": after,
            "crashed": crashed}


def _crash_during_save(model, directory, save_checkpoint):
    """A save that dies after the temporary directory exists must not touch the checkpoint."""

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    model.sharded_state_dict = fail
    try:
        save_checkpoint(model, directory, metadata={"recipe": "never"})
    except OSError:
        return True
    return False


def _worker(directory):
    # One spawn for all checks: starting two ranks and importing Megatron costs more than
    # the checks themselves on a 2-core machine.
    return {"tp": _tp_worker(), "ckpt": _checkpoint_worker(directory)}


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron_ckpt")


@pytest.fixture(scope="module")
def parallel_results(checkpoint_root):
    return run_ranks(_worker, world_size=2, args=(str(checkpoint_root / "ckpt"),), timeout_s=220)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_checkpoint_saved_at_tp2_loads_at_tp1(parallel_results, checkpoint_root):
    tmp_path = checkpoint_root
    for r in (r["ckpt"] for r in parallel_results):
        assert r["meta"] == {"recipe": "test", "step": 1}
        assert r["record"]["parallel"]["tp"] == 2
        assert r["before"] > 1e-2  # the freshly built model really differs
        assert r["crashed"]
        assert r["after"] < ATOL, r  # the crashed save left the previous checkpoint usable
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    # The crashed save removed its partial directory; no ".old" is left behind.
    assert leftovers == ["ckpt"], leftovers
