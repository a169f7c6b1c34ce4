"""HF checkpoint of each family -> megaquant's Megatron GPTModel: logits equal transformers' own.

Each family is a tiny random model built and saved by transformers (tests/families/families.py);
megaquant reads the directory (no transformers at run time), builds the model with its spec and
loads the mapped weights. Reference: transformers' forward of the same model, float32.
Tolerance: 1e-4 relative to the largest logit (float32 forward, 2 layers, logits O(1..4)).
The parallel test compares TP=2 (dense and MoE) and EP=2 (MoE) with the same reference.
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.families.families import DENSE, MOE, hf_logits, save_family

SEQ = 16


def _tokens():
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))


def assert_logits_close(got, ref, what=""):
    assert ref.abs().max() > 0.5, what  # not a degenerate model
    tol = 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=tol,
                               msg=lambda m: f"{what}: {m}")


def megatron_logits(directory, tp=1, tp_rank=0, ep=1, ep_rank=0, tp_group=None):
    """Read ``directory``, build this rank's model, return the full-vocabulary logits."""
    import torch.distributed as dist

    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.models.hf import read_hf_model
    from megaquant.models.mapping import hf_to_megatron

    cfg, state = read_hf_model(directory)
    arch = GPTConfig.from_dict({**cfg, "seq_length": SEQ})
    model = build_gpt_model(arch, tp_size=tp, ep_size=ep)
    missing, unexpected = model.load_state_dict(
        hf_to_megatron(state, arch, tp_rank, tp, ep_rank=ep_rank, ep_size=ep), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected, \
        (missing, unexpected)
    tokens = _tokens()
    with torch.no_grad():
        local = model.eval()(tokens, torch.arange(SEQ)[None].expand_as(tokens), None)
    if tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("family", DENSE + MOE)
def test_import_logits_equal_transformers(megatron_single, tmp_path, family):
    hf = save_family(family, tmp_path / family)
    assert_logits_close(megatron_logits(tmp_path / family), hf_logits(hf, _tokens()), family)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_import_transformers4_config_dialect(megatron_single, tmp_path, family):
    """rope_theta + rope_scaling (4.x) read like rope_parameters (5.x)."""
    hf = save_family(family, tmp_path / family, dialect="4")
    assert_logits_close(megatron_logits(tmp_path / family), hf_logits(hf, _tokens()), family)


def test_import_rope_scaling_matters(megatron_single, tmp_path):
    """The llama3 fixture would fail without its scaling (so the test above can fail)."""
    import json

    hf = save_family("llama3", tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    path.write_text(json.dumps(cfg))
    got, ref = megatron_logits(tmp_path / "m"), hf_logits(hf, _tokens())
    assert (got - ref).abs().max() > 1e-2


PARALLEL_CASES = [("llama3", 2, 1), ("qwen2", 2, 1), ("qwen3", 2, 1), ("llama_tied", 2, 1),
                  ("qwen3_moe", 1, 2), ("mixtral", 1, 2), ("qwen2_moe", 1, 2), ("qwen3_moe", 2, 1)]


def _parallel_worker(jobs):
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=120)
    out = []
    for directory, tp, ep in jobs:
        groups = init_model_parallel(tp=tp, ep=ep)
        out.append(megatron_logits(directory, tp, groups.tp_rank, ep, groups.ep_rank,
                                   groups.tp_group))
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_import_logits_tp2_ep2_equal_transformers(tmp_path):
    """Dense families at TP=2, MoE families at EP=2 and TP=2: every rank's full logits equal
    transformers' (the same tolerance as at TP=1)."""
    refs, jobs = [], []
    for family, tp, ep in PARALLEL_CASES:
        d = tmp_path / f"{family}_{tp}_{ep}"
        refs.append(hf_logits(save_family(family, d), _tokens()))
        jobs.append((str(d), tp, ep))
    per_rank = run_ranks(_parallel_worker, 2, (jobs,), timeout_s=560)
    for rank, results in enumerate(per_rank):
        for (family, tp, ep), got, ref in zip(PARALLEL_CASES, results, refs):
            assert_logits_close(got, ref, f"{family} tp={tp} ep={ep} rank {rank}")
