"""QAT of the tiny MoE under expert parallelism (EP=2, 2 ranks) equals the EP=1 run on the same
global batches; an expert that gets no token trains without a hang; resume at EP=2 is exact;
a checkpoint saved at EP=2 loads at EP=1 (weights, AdamW moments, quantizer amax).

One 2-rank spawn (EP=2: the DP group is both ranks, the expert-DP group each rank alone) runs
every EP=2 case; the parent computes the EP=1 references in-process from the same weights
(every expert distinct), data and calibration batches, recipe nvfp4, clipping at 1.0 (the
grad norm is ~1.7, so clipping binds every step and a wrong norm changes the update).

Tolerances. EP=2 does the same per-token math as EP=1; what differs is summation order: an
expert's weight gradient sums the tokens of both micro-batches in one GEMM at EP=2, but over
two backward passes at EP=1, and the norm adds float64 partial sums in another order. Those are
float32 rounding differences (~1e-7 relative) that could flip a fake-quantization rounding tie,
so losses (~5.5) are compared within 1e-5, grad norms (~1.7) within rtol 1e-6 (measured: losses
equal, grad norms within 1e-8). Before the EP rules, the loss differed by 1e-4 to 5e-3 by
step 4 (expert grads summed across different experts, or each rank clipping with the norm of
its own experts only). Resume and the EP=2 -> EP=1 reshard move the same bytes: compared bit
for bit; the evaluation of the resharded model is another layout's forward: 1e-5.
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.qat import helpers as h

STEPS = 4
LAYOUT_EP2 = {"tp": 1, "dp": 2, "ep": 2, "world_size": 2}


def _recipe():
    import yaml

    from megaquant.recipe import RECIPE_DIR

    return yaml.safe_load((RECIPE_DIR / f"{h.RECIPE}.yaml").read_text())


def _run(groups, full, empty_expert=False):
    """(model, optimizer, [(loss, grad_norm)] per step) of STEPS steps at this layout."""
    model = h.build_moe(groups, full, empty_expert=empty_expert)
    opt, recs = h.train_records(groups, model, steps=STEPS)
    return model, opt, [(r["loss"], r["grad_norm"]) for r in recs]


def _expert_moments(model, opt, groups, expert):
    """Max |exp_avg| of global ``expert``'s params on this rank (None if it is not here)."""
    state = h.global_state(model, groups, "exp_avg", opt)
    mine = [v for k, v in state.items() if f".local_experts.{expert}." in k]
    return max(float(v.abs().max()) for v in mine) if mine else None


def _ep2_worker(full, ckpt):
    from megaquant.evaluate import evaluate_loss
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state, save_train_state
    from tests.moe.moe_helpers import global_amax

    init_distributed(timeout_s=150)
    groups = init_model_parallel(tp=1, ep=2)
    assert groups.dp == 2 and groups.expt_dp_group.size() == 1
    out = {"records": _run(groups, full)[2]}
    model, opt, out["starved"] = _run(groups, full, empty_expert=True)
    out["starved_moments"] = {e: _expert_moments(model, opt, groups, e) for e in range(4)}

    # Exact resume: 2 steps, save, a fresh model (other weights) + optimizer, load, 2 steps.
    recipe = _recipe()
    m1 = h.build_moe(groups, full)
    o1, first = h.train_records(groups, m1, steps=STEPS, stop_after=2)
    save_train_state(m1, o1, ckpt, step=2, metadata={"recipe_config": recipe})
    m2 = h.build_moe(groups, h.full_moe_state_seeded(99), calibrate=False)
    o2 = build_optimizer(m2, h.settings()[1])
    step = load_train_state(m2, o2, f"{ckpt}/step_0000002", recipe_config=recipe,
                            layout=LAYOUT_EP2)["step"]
    o2, second = h.train_records(groups, m2, o2, steps=STEPS, start=step)
    out["resumed"] = [(r["loss"], r["grad_norm"]) for r in first + second]
    save_train_state(m2, o2, ckpt, step=STEPS, metadata={"recipe_config": recipe})
    out["eval"] = evaluate_loss(m2, h.eval_batches(), groups.dp_group)
    out["params"] = h.global_state(m2, groups)
    out["exp_avg"] = h.global_state(m2, groups, "exp_avg", o2)
    out["amax"] = global_amax(m2, groups.ep_rank, 2)
    return out


def _merge(per_rank, key):
    merged = {}
    for r in per_rank:
        for k, v in r[key].items():
            assert k not in merged or torch.equal(merged[k], v), f"ranks disagree on {k}"
            merged[k] = v
    return merged


def _assert_close_records(got, want, what):
    assert len(got) == len(want) == STEPS, what
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, want)):
        assert loss == pytest.approx(ref_loss, abs=1e-5), (what, step, loss, ref_loss)
        assert norm == pytest.approx(ref_norm, rel=1e-6), (what, step, norm, ref_norm)
        assert ref_norm > 1.0, "clipping must bind for the norm rule to matter"


@pytest.fixture(scope="module")
def ep2(megatron_single, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("qat_ep_ckpt")
    full = h.full_moe_state()
    return full, run_ranks(_ep2_worker, 2, (full, str(ckpt)), timeout_s=280), ckpt


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_qat_ep2_matches_ep1_with_and_without_a_starved_expert(megatron_single, ep2):
    from tests.moe.moe_helpers import EMPTY_EXPERT

    full, per_rank, _ = ep2
    ref = _run(megatron_single, full)[2]
    model, opt, ref_starved = _run(megatron_single, full, empty_expert=True)
    for rank, r in enumerate(per_rank):
        _assert_close_records(r["records"], ref, f"ep2 rank {rank}")
        _assert_close_records(r["starved"], ref_starved, f"ep2 starved rank {rank}")
    # The starved expert got zero grads (zero first moment) and stepped with the others;
    # the rank that holds it (EP rank 1) did not hang waiting for its tokens.
    ref_moments = {e: _expert_moments(model, opt, megatron_single, e) for e in range(4)}
    got = {e: v for r in per_rank for e, v in r["starved_moments"].items() if v is not None}
    assert got.keys() == ref_moments.keys()
    for e in range(4):
        assert (got[e] == 0) == (e == EMPTY_EXPERT) == (ref_moments[e] == 0), (e, got[e])


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_qat_ep2_resume_is_exact_and_reshards_to_ep1(megatron_single, ep2):
    from megaquant.evaluate import evaluate_loss
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state
    from tests.moe.moe_helpers import global_amax

    _, per_rank, ckpt = ep2
    for rank, r in enumerate(per_rank):
        assert r["resumed"] == r["records"], f"rank {rank}: resume at EP=2 is not exact"
        assert r["eval"] == per_rank[0]["eval"]

    # The EP=2 checkpoint at EP=1: every expert's weights, moments and amax come back under
    # its global index, bit for bit, and the evaluation loss is the EP=2 one.
    model = h.build_moe(megatron_single, h.full_moe_state_seeded(7), calibrate=False)
    opt = build_optimizer(model, h.settings()[1])
    meta = load_train_state(model, opt, f"{ckpt}/step_{STEPS:07d}", recipe_config=_recipe(),
                            layout={"tp": 1, "dp": 1, "ep": 1, "world_size": 1})
    assert meta["step"] == STEPS
    for key, got in (("params", h.global_state(model, megatron_single)),
                     ("exp_avg", h.global_state(model, megatron_single, "exp_avg", opt)),
                     ("amax", global_amax(model, 0, 4))):
        saved = _merge(per_rank, key)
        assert got.keys() == saved.keys() and any(".local_experts.3." in k for k in got), key
        for k, v in got.items():
            assert torch.equal(v, saved[k]), (key, k)
            assert v.abs().sum() > 0, (key, k)  # real state, not zeros on both sides
    loss = evaluate_loss(model, h.eval_batches(), megatron_single.dp_group)
    assert loss == pytest.approx(per_rank[0]["eval"], abs=1e-5)
