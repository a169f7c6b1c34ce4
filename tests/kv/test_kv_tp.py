"""KV-cache amax under tensor and data parallelism equals the single-process one.

Heads (and KV groups) are split over TP, so each rank sees only its heads' keys and values:
the per-layer K/V amax must be the MAX over TP and DP (megaquant.calib.sync). The tiny GPT
(2 KV groups: one per rank at TP=2) is quantized with FP8 (max and MSE-searched) and NVFP4 KV
at TP=1, TP=2, TP=2 with sequence parallelism and DP=2; every amax must equal TP=1's (rtol
1e-5: the same numbers, up to the order of row-parallel sums upstream) and the loss too (atol
1e-4).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.sharding import on_two_rank_layouts, random_batches, tiny_full_state

RECIPES = {
    "fp8_kv_only": {"name": "fp8_kv_only", "rules": [], "kv_cache": {"format": "fp8"}},
    # MSE-searched K/V scales: errors SUM-reduced over TP and DP before the argmin
    "fp8_kv_mse": {"name": "fp8_kv_mse", "rules": [], "kv_cache": {"format": "fp8"},
                   "calib": {"algorithm": "mse", "ratios": 8}},
    "nvfp4_nvfp4kv": {"name": "nvfp4_nvfp4kv", "kv_cache": {"format": "nvfp4"},
                      "rules": [{"modules": "*", "weight": {"format": "nvfp4"},
                                 "input": {"format": "nvfp4"}}]},
}


def _quantize_all(groups, tp, sp, full_state):
    from megaquant.evaluate import evaluate_loss
    from tests.sharding import quantized_tiny_shard, unsharded_amax

    calib, evals = [b[:, :-1] for b in random_batches(4, 1)], random_batches(2, 2)
    out = {}
    for name, recipe in RECIPES.items():
        model = quantized_tiny_shard(groups, tp, sp, full_state, recipe, calib)
        amax = {k: v for k, v in unsharded_amax(model).items() if "core_attention" in k}
        out[name] = {"loss": evaluate_loss(model, evals, groups.dp_group), "amax": amax}
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_kv_amax_tp2_sp_and_dp2_match_single_process(megatron_single):
    full = tiny_full_state()
    ref = _quantize_all(megatron_single, 1, False, full)
    by_rank = run_ranks(on_two_rank_layouts, 2, (_quantize_all, full), timeout_s=240)
    for rank, layouts in enumerate(by_rank):
        for layout, res in layouts.items():
            for recipe, want in ref.items():
                got = res[recipe]
                assert len(want["amax"]) == 4 and got["amax"].keys() == want["amax"].keys()
                for k in want["amax"]:
                    torch.testing.assert_close(got["amax"][k], want["amax"][k], rtol=1e-5, atol=0,
                                               msg=f"{layout} rank {rank} {recipe} {k}")
                assert abs(got["loss"] - want["loss"]) < 1e-4, (layout, rank, recipe)
