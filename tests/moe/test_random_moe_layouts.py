"""``model=tiny_moe`` is the same random model at EP=1 and EP=2, so CLI runs can be compared.

Reference: the EP=1 model built in one process; the EP=2 ranks' tensors, experts renamed to their
global index, must equal it exactly (before the fix: experts and every later layer differed).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.moe.random_moe_worker import build_global_state


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_tiny_moe_random_model_is_identical_at_ep1_and_ep2():
    one = run_ranks(build_global_state, 1, args=(1,), timeout_s=300)[0]
    two = run_ranks(build_global_state, 2, args=(2,), timeout_s=300)
    merged = {**two[0], **two[1]}
    assert sorted(merged) == sorted(one)
    different = [k for k in one if not torch.equal(one[k], merged[k])]
    assert different == []
    experts = [one[k] for k in sorted(one) if ".local_experts." in k and k.endswith("fc1.weight")]
    assert not torch.equal(experts[0], experts[1])  # experts are distinct, not copies
