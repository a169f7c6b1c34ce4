"""MoE quantization under expert parallelism equals the EP=1, TP=1 result on the same weights.

One 2-rank spawn (EP=2) runs: both token dispatchers x two recipes; a router forced so that
expert 3 never gets a token; one input amax shared by all experts; a NaN seen by one rank only;
and saves two quantized checkpoints that the parent reloads at EP=1. One 4-rank spawn runs
TP=2 x EP=2 (expert-TP=2, sequence parallel) for both dispatchers. The parent computes every
reference in-process at EP=1. Tolerances: amax rtol 1e-5 (the same numbers, possibly summed in
another order by the row-parallel GEMMs), losses atol 1e-4 (float32 forwards, loss ~5.5);
checkpoint round trips must be bitwise.
"""

import pytest
import torch
import yaml

from tests.distributed_utils import run_ranks
from tests.moe.moe_helpers import (
    EMPTY_EXPERT,
    RECIPES,
    batches,
    force_empty_expert,
    full_moe_state,
    global_amax,
    merge_ranks,
    quantize_layout,
)

DISPATCHERS = ("allgather", "alltoall")
# 4 ranks on 2 cores are slow: each dispatcher once, each recipe once.
TP2_CASES = (("allgather", "fp8_per_channel"), ("alltoall", "nvfp4"))


def _cfg(dispatcher="alltoall"):
    from megaquant.models.gpt import tiny_moe_config

    return tiny_moe_config(moe_token_dispatcher=dispatcher)


def _strip(result):
    return {k: v for k, v in result.items() if k != "model"}


def _nan_on_one_rank(groups, full):
    """Rank 1 holds expert 3 with a NaN weight; expert 3 gets no tokens, so only rank 1 sees it."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import build_gpt_model
    from megaquant.spec import get_spec_provider
    from tests.moe.moe_helpers import load_sharded

    cfg = _cfg()
    model = build_gpt_model(cfg, get_spec_provider("local"), tp_size=1, ep_size=2)
    load_sharded(model, full, 0, 1, groups.ep_rank, 2)
    force_empty_expert(model)
    if groups.ep_rank == 1:
        with torch.no_grad():
            model.decoder.layers[1].mlp.experts.local_experts[1].linear_fc2.weight[0, 0] = \
                float("nan")
    calib = [b[:, :-1] for b in batches(2, 1)]
    try:
        megaquant.quantize(model, "fp8_per_channel",
                           lambda m: run_forward(m, calib, "calib", groups.dp_group),
                           dp_group=groups.dp_group)
    except FloatingPointError as e:
        return str(e)
    return None


def _ep2_worker(full, ckpt_dir):
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.recipe import RECIPE_DIR

    init_distributed(timeout_s=120)
    groups = init_model_parallel(tp=1, ep=2)
    out = {}
    for disp in DISPATCHERS:
        for recipe in RECIPES:
            res = quantize_layout(groups, _cfg(disp), full, recipe)
            out[(disp, recipe)] = _strip(res)
            if disp == "alltoall":
                conf = yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text())
                save_checkpoint(res["model"], f"{ckpt_dir}/{recipe}",
                                metadata={"recipe_config": conf})
    out["empty"] = _strip(quantize_layout(groups, _cfg(), full, "fp8_per_channel",
                                          empty_expert=True))
    out["share"] = _strip(quantize_layout(groups, _cfg(), full, "fp8_per_channel", share=True))
    out["nan"] = _nan_on_one_rank(groups, full)
    return out


def _tp2_ep2_worker(full):
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=150)
    groups = init_model_parallel(tp=2, ep=2)
    return {case: _strip(quantize_layout(groups, _cfg(case[0]), full, case[1]))
            for case in TP2_CASES}


def _assert_same(got, want, what):
    assert got["amax"].keys() == want["amax"].keys(), what
    assert any(".local_experts.3." in k for k in want["amax"]), what  # experts are in there
    for k in want["amax"]:
        torch.testing.assert_close(got["amax"][k], want["amax"][k], rtol=1e-5, atol=0,
                                   msg=f"{what}: {k}")
    assert abs(got["loss"] - want["loss"]) < 1e-4, (what, got["loss"], want["loss"])


def _merged(per_rank):
    return {"amax": merge_ranks([r["amax"] for r in per_rank]), "loss": per_rank[0]["loss"]}


@pytest.fixture(scope="module")
def full_state(megatron_single):
    return full_moe_state(_cfg())


@pytest.fixture(scope="module")
def references(megatron_single, full_state):
    ref = {(d, r): _strip(quantize_layout(megatron_single, _cfg(d), full_state, r))
           for d in DISPATCHERS for r in RECIPES}
    ref["empty"] = _strip(quantize_layout(megatron_single, _cfg(), full_state,
                                          "fp8_per_channel", empty_expert=True))
    ref["share"] = _strip(quantize_layout(megatron_single, _cfg(), full_state,
                                          "fp8_per_channel", share=True))
    return ref


@pytest.fixture(scope="module")
def ep2(full_state, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("moe_ckpt")
    per_rank = run_ranks(_ep2_worker, 2, (full_state, str(ckpt)), timeout_s=300)
    return per_rank, ckpt


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_moe_ep2_matches_ep1_both_dispatchers(references, ep2):
    per_rank, _ = ep2
    for case in [(d, r) for d in DISPATCHERS for r in RECIPES]:
        _assert_same(_merged([r[case] for r in per_rank]), references[case], f"ep2 {case}")
        assert per_rank[0][case]["loss"] == per_rank[1][case]["loss"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_moe_expert_without_tokens_calibrates_everywhere(references, ep2, full_state):
    per_rank, _ = ep2
    got, want = _merged([r["empty"] for r in per_rank]), references["empty"]
    _assert_same(got, want, "empty expert")
    amax = got["amax"]
    for layer in range(2):
        pre = f"decoder.layers.{layer}.mlp.experts.local_experts."
        for linear in ("linear_fc1", "linear_fc2"):
            # The weight amax comes from the weight alone: per output channel, max |w|.
            w = full_state[f"{pre}{EMPTY_EXPERT}.{linear}.weight"]
            wq = amax[f"{pre}{EMPTY_EXPERT}.{linear}.weight_quantizer"]
            torch.testing.assert_close(wq.reshape(-1), w.abs().amax(dim=1), rtol=0, atol=0)
            # The input amax falls back to the layer's pool: the max over the other experts.
            pool = max(amax[f"{pre}{e}.{linear}.input_quantizer"] for e in range(4)
                       if e != EMPTY_EXPERT)
            assert float(pool) > 0
            assert torch.equal(amax[f"{pre}{EMPTY_EXPERT}.{linear}.input_quantizer"], pool)
    # Only the rank that holds expert 3 (EP rank 1, local expert 1) reports it.
    assert per_rank[0]["empty"]["report"]["expert_inputs_without_tokens"] == []
    assert len(per_rank[1]["empty"]["report"]["expert_inputs_without_tokens"]) == 4
    assert want["report"]["expert_inputs_without_tokens"] and all(
        f"local_experts.{EMPTY_EXPERT}." in n
        for n in want["report"]["expert_inputs_without_tokens"])


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_moe_shared_expert_input_amax_is_ep_invariant(references, ep2):
    per_rank, _ = ep2
    got = _merged([r["share"] for r in per_rank])
    _assert_same(got, references["share"], "shared input amax")
    for layer in range(2):
        for linear in ("linear_fc1", "linear_fc2"):
            values = {float(got["amax"][f"decoder.layers.{layer}.mlp.experts.local_experts."
                                        f"{e}.{linear}.input_quantizer"]) for e in range(4)}
            assert len(values) == 1, (layer, linear, values)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_moe_nan_on_one_rank_raises_on_every_rank(ep2):
    per_rank, _ = ep2
    for rank, r in enumerate(per_rank):
        assert r["nan"] is not None, f"rank {rank} did not raise"
        assert "decoder.layers.1.mlp.experts.local_experts.1.linear_fc2" in r["nan"], r["nan"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_moe_checkpoint_saved_at_ep2_loads_at_ep1(megatron_single, ep2):
    from megaquant.evaluate import evaluate_loss
    from megaquant.models.gpt import build_gpt_model
    from megaquant.ptq import load_quantized

    per_rank, ckpt = ep2
    for recipe in RECIPES:
        saved = _merged([r[("alltoall", recipe)] for r in per_rank])
        torch.manual_seed(123)  # other initial weights: everything must come from the file
        model = build_gpt_model(_cfg(), tp_size=1, ep_size=1)
        load_quantized(model, ckpt / recipe)
        got = global_amax(model, 0, 4)
        assert got.keys() == saved["amax"].keys() and got
        for k in got:
            assert torch.equal(got[k], saved["amax"][k]), (recipe, k)
        loss = evaluate_loss(model, batches(2, 2), megatron_single.dp_group)
        assert abs(loss - saved["loss"]) < 1e-4, (recipe, loss, saved["loss"])


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_moe_tp2_ep2_matches_single_process(references, full_state):
    per_rank = run_ranks(_tp2_ep2_worker, 4, (full_state,), timeout_s=360)
    for case in TP2_CASES:
        _assert_same(_merged([r[case] for r in per_rank]), references[case], f"tp2xep2 {case}")
