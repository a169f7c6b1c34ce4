"""The uneven reduce-scatter of the CPU alltoall dispatcher (``portable._UnevenReduceScatter``)
against a single-process float64 reference.

Two gloo ranks each hold a full ``[sum(sizes), 3]`` input; rank r's output is the sum over
ranks of rows ``sizes[r]`` of their inputs, and with ``loss_r = <output_r, g_r>`` every rank's
input gradient is ``cat(g_0, g_1)`` (the uneven all-gather gloo lacks, done here with one
``all_to_all_single``). The parent computes both from the full tensors. float64 and sums of two
terms: forward within 1e-12; the gradient is copied, so bitwise. Split sizes (3, 5) and (0, 4),
a rank that receives no rows (an expert-TP rank whose experts got no token).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks

SPLITS = ((3, 5), (0, 4))
WORLD = 2


def _data(sizes):
    """(input per rank, output gradient per rank), float64, drawn from one seed."""
    g = torch.Generator().manual_seed(sum(sizes))
    inputs = [torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64) for _ in range(WORLD)]
    grads = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in sizes]
    return inputs, grads


def _worker():
    import torch.distributed as dist

    from megaquant.megatron.dist import init_distributed
    from megaquant.megatron.portable import _UnevenReduceScatter

    init_distributed(timeout_s=60)
    rank, group = dist.get_rank(), dist.group.WORLD
    out = {}
    for sizes in SPLITS:
        inputs, grads = _data(sizes)
        x = inputs[rank].clone().requires_grad_(True)
        y = _UnevenReduceScatter.apply(x, group, list(sizes))
        (y * grads[rank]).sum().backward()
        out[sizes] = (y.detach(), x.grad)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_uneven_reduce_scatter_matches_reference_forward_and_grad():
    per_rank = run_ranks(_worker, WORLD, timeout_s=90)
    for sizes in SPLITS:
        inputs, grads = _data(sizes)
        summed = torch.stack(inputs).sum(0)
        want_out = summed.split(list(sizes))
        want_grad = torch.cat(grads)  # d<y_r, g_r>/dx summed over r: each rank's slice of g
        for rank, result in enumerate(per_rank):
            got_out, got_grad = result[sizes]
            assert got_out.shape == (sizes[rank], 3), (sizes, rank)
            torch.testing.assert_close(got_out, want_out[rank], rtol=0, atol=1e-12)
            assert torch.equal(got_grad, want_grad), (sizes, rank)
