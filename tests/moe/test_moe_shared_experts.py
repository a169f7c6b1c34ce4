"""Shared experts are quantized like a dense MLP and calibrate the same at EP=2 as at EP=1.

A ``SharedExpertMLP`` runs on every token beside the routed experts; its linears are ordinary
(non-expert) column/row-parallel layers, so they convert through the same registry and their
amax follows the dense rules: replicated across EP ranks, reduced over the data-parallel
group. Reference: the EP=1 model with the same weights (amax rtol 1e-5, loss atol 1e-4).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.moe.moe_helpers import full_moe_state, merge_ranks, quantize_layout

RECIPE = "fp8_per_channel"


def _cfg():
    from megaquant.models.gpt import tiny_moe_config

    return tiny_moe_config(moe_token_dispatcher="alltoall", moe_shared_expert_intermediate_size=64)


def _ep2_worker(full):
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=120)
    res = quantize_layout(init_model_parallel(ep=2), _cfg(), full, RECIPE)
    return {"amax": res["amax"], "loss": res["loss"]}


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_moe_shared_experts_quantized_and_ep2_matches_ep1(megatron_single):
    from megaquant.nn.local import QuantColumnParallelLinear

    full = full_moe_state(_cfg())
    ref = quantize_layout(megatron_single, _cfg(), full, RECIPE)
    shared = ref["model"].decoder.layers[0].mlp.shared_experts
    assert isinstance(shared.linear_fc1, QuantColumnParallelLinear)
    shared_keys = [k for k in ref["amax"] if ".shared_experts." in k]
    assert len(shared_keys) == 2 * 4  # fc1/fc2 x weight/input, in each of 2 layers
    per_rank = run_ranks(_ep2_worker, 2, (full,), timeout_s=360)
    got = merge_ranks([r["amax"] for r in per_rank])
    assert got.keys() == ref["amax"].keys()
    for k, want in ref["amax"].items():
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=0, msg=k)
    for r in per_rank:
        assert abs(r["loss"] - ref["loss"]) < 1e-4
