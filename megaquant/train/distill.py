"""Distillation loss for QAD: KL(teacher || student) on next-token logits, vocab-parallel.

Under tensor parallelism each rank holds ``logits[..., V/tp]``: a slice of the vocabulary. The
KL per token, with ``p`` the teacher's and ``q`` the student's softmax at temperature ``T``, is

    KL = sum_v p_v (log p_v - log q_v) = sum_v p_v (log p_v - s_v) + logZ_s

(``s`` the student's scaled logits, ``logZ_s = log sum_v exp s_v``, and ``sum_v p_v = 1``).
Both vocabulary sums are split over TP ranks, so each is a local partial sum followed by one
all-reduce over the TP group (plus a MAX all-reduce for the numerically safe shift of the
log-sum-exp, which needs no gradient).

Gradients: the all-reduces that carry the student's dependence use Megatron's
``reduce_from_tensor_model_parallel_region`` (forward: sum; backward: identity). That is exact
here because everything after the sum (the token mean) is the same on every TP rank, so the
gradient reaching the sum is replicated and the identity hands each rank the gradient of its own
partial sum. The teacher runs under ``no_grad``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _log_softmax_parts(logits: Tensor, tp_group, grad: bool) -> tuple[Tensor, Tensor]:
    """(shifted local logits, global log-sum-exp of the shifted logits), both [..., ...]."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    shift = logits.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - shift
    local = shifted.exp().sum(dim=-1, keepdim=True)
    total = reduce_from_tensor_model_parallel_region(local, group=tp_group) if grad else \
        _sum(local, tp_group)
    return shifted, total.log()


def _sum(x: Tensor, tp_group) -> Tensor:
    x = x.clone()
    dist.all_reduce(x, group=tp_group)
    return x


def vocab_parallel_kl(student_logits: Tensor, teacher_logits: Tensor, tp_group,
                      temperature: float = 1.0) -> Tensor:
    """Per-token KL(teacher || student) in nats, ``[...]`` (the vocab dim reduced), times T**2.

    ``*_logits``: ``[..., V/tp]`` on each rank of ``tp_group`` (the full vocabulary at TP=1).
    Computed in float32 whatever the logits' dtype.
    """
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    s = student_logits.float() / temperature
    with torch.no_grad():
        t_shifted, t_lse = _log_softmax_parts(teacher_logits.float() / temperature, tp_group,
                                              grad=False)
        log_p = t_shifted - t_lse
        p = log_p.exp()
    s_shifted, s_lse = _log_softmax_parts(s, tp_group, grad=True)
    partial = (p * (log_p - s_shifted)).sum(dim=-1, keepdim=True)
    kl = reduce_from_tensor_model_parallel_region(partial, group=tp_group) + s_lse
    return kl.squeeze(-1) * temperature ** 2
