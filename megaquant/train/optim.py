"""The optimizer and the gradient bookkeeping around it, with explicit process groups.

Which optimizer, and why: Megatron's ``DistributedOptimizer`` needs the model wrapped in
Megatron's ``DistributedDataParallel`` (contiguous grad buffers) and, in megatron-core 0.16.1,
CUDA for its buffers and its fused grad-norm (``multi_tensor_applier`` with a CUDA overflow
flag). The CPU/gloo runtime has neither, so megaquant trains with ``torch.optim.AdamW`` on
every device and does the three things Megatron's wrappers would do, in a few lines each:

1. **DP gradient all-reduce** (``reduce_gradients``): every DP rank ran its own micro-batches;
   grads are summed over ``dp_group`` in one flat buffer. The loss is already divided by the
   global token count, so the sum is the gradient of the global mean.
2. **Sequence-parallel grads**: params marked ``sequence_parallel`` (norm weights under SP) saw
   only this rank's sequence slice; their grads are summed over ``tp_group``.
3. **Grad norm under TP** (``grad_norm``): a TP-sharded param (``tensor_model_parallel``)
   contributes its local squares on every TP rank; a replicated one only on TP rank 0, so it is
   counted once. One SUM all-reduce over ``tp_group`` (DP ranks hold identical grads by then).

Optimizer state is plain per-param tensors shaped like the params, which is what lets
:mod:`megaquant.train.state` save it through the same sharded descriptions as the weights and
reshard it with them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaquant.train.config import OptimConfig


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable params; no weight decay on 1-D params (norms, biases)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-param loop gives the same bits as a single process would, which
    # exact-resume and the parallel tests rely on; speed is the matmuls', not this loop's.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas,
                             eps=optim.eps, foreach=False)


def _flat_all_reduce(tensors: list[torch.Tensor], group) -> None:
    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_gradients(model: nn.Module, *, dp_group, tp_group) -> None:
    """Sum grads over ``dp_group``, and sequence-parallel grads over ``tp_group`` (see top)."""
    params = [p for p in model.parameters() if p.grad is not None]
    _flat_all_reduce([p.grad for p in params if getattr(p, "sequence_parallel", False)], tp_group)
    _flat_all_reduce([p.grad for p in params], dp_group)


def grad_norm(model: nn.Module, tp_group) -> float:
    """Global L2 norm of the gradients, each TP-replicated param counted once."""
    tp_rank = dist.get_rank(tp_group)
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            sq += p.grad.detach().double().pow(2).sum().cpu()
    sq = sq.to(next(model.parameters()).device)
    dist.all_reduce(sq, group=tp_group)
    return sq.sqrt().item()


def clip_gradients(model: nn.Module, max_norm: float, tp_group) -> float:
    """Scale grads so their global norm is at most ``max_norm`` (0: no clipping); returns it."""
    norm = grad_norm(model, tp_group)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
