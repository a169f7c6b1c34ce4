"""Calibration algorithms under TP=2, TP=2 + sequence parallelism and DP=2 equal one process.

The tiny GPT (TP=1 weights sharded by hand into the TP=2 model) is quantized with each
algorithm. Compared with the TP=1 run: the evaluation loss (float32 forwards, atol 1e-4 on ~5.5),
every amax gathered to its unsharded form (rtol 1e-5: same numbers up to reduction order), and
the norm weights, which carry the SmoothQuant/AWQ scales (rtol 1e-5). What this checks: the
statistics reductions of each algorithm (MAX/SUM over TP and DP, the row-parallel all-gathers)
and that every rank picks the same search result. TP=3 on SmolLM2 is a benchmark
(``torchrun --nproc-per-node=3 benchmarks/calib.py --tp 3``), too slow for CI.
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.sharding import on_two_rank_layouts, random_batches, tiny_full_state

INT4 = {"name": "int4_32",
        "rules": [{"modules": "*", "weight": {"format": "int4", "block_size": 32}}]}
RECIPES = {"int8_sq": "int8_sq", "int4_awq": INT4 | {"calib": "awq"}, "nvfp4_mse": "nvfp4_mse",
           "nvfp4_gptq": "nvfp4_gptq"}


def _quantize_all(groups, tp, sp, full_state):
    from megaquant.evaluate import evaluate_loss
    from tests.nn.test_tp_invariance import _full_amax
    from tests.sharding import quantized_tiny_shard

    calib, evals = [b[:, :-1] for b in random_batches(4, 1)], random_batches(2, 2)
    results = {}
    for key, recipe in RECIPES.items():
        model = quantized_tiny_shard(groups, tp, sp, full_state, recipe, calib)
        norms = {k: v.clone() for k, v in model.state_dict().items() if "layernorm.weight" in k}
        results[key] = {"loss": evaluate_loss(model, evals, groups.dp_group),
                        "amax": _full_amax(model, groups.tp_group), "norms": norms}
    return results


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_algorithms_tp2_sp_and_dp2_match_single_process(megatron_single):
    full = tiny_full_state()
    ref = _quantize_all(megatron_single, 1, False, full)
    by_rank = run_ranks(on_two_rank_layouts, 2, (_quantize_all, full), timeout_s=540)
    for rank, res in enumerate(by_rank):
        for layout, per_recipe in res.items():
            for key, want in ref.items():
                got, where = per_recipe[key], f"{layout} rank {rank} {key}"
                assert abs(got["loss"] - want["loss"]) < 1e-4, (where, got["loss"], want["loss"])
                assert got["amax"].keys() == want["amax"].keys(), where
                assert want["amax"] or key == "int4_awq", where  # INT4 blocks have no amax
                for k in want["amax"]:
                    torch.testing.assert_close(got["amax"][k], want["amax"][k], rtol=1e-5,
                                               atol=0, msg=f"{where} {k}")
                for k in want["norms"]:
                    torch.testing.assert_close(got["norms"][k], want["norms"][k], rtol=1e-5,
                                               atol=0, msg=f"{where} {k}")
