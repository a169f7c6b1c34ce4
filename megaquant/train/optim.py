"""The optimizer and the gradient bookkeeping around it, with explicit process groups.

Which optimizer, and why: Megatron's ``DistributedOptimizer`` needs the model wrapped in
Megatron's ``DistributedDataParallel`` (contiguous grad buffers) and, in megatron-core 0.16.1,
CUDA for its buffers and its fused grad-norm (``multi_tensor_applier`` with a CUDA overflow
flag). The CPU/gloo runtime has neither, so megaquant trains with ``torch.optim.AdamW`` on
every device and does what Megatron's wrappers would do, in a few lines each.

Two kinds of parameter, as Megatron sorts them (``not param.allreduce``, set by its linears
and experts when ``expert_model_parallel_size > 1``; ``is_expert_parallel`` below):

* **dense** (attention, norms, embeddings, router, shared experts, and routed experts at
  EP=1): replicated over the data-parallel group ``dp_group``;
* **expert-parallel** (routed experts at EP > 1): each EP rank holds *other* experts, so they
  are replicated only over the expert-data-parallel group ``expert_dp_group`` (EP=2 on 2
  ranks: DP group of size 2, expert-DP group of size 1).

The rules (Megatron's DDP and ``ChainedOptimizer`` do the same):

1. **Gradient sum** (``reduce_gradients``): dense grads are summed over ``dp_group``, expert
   grads over ``expert_dp_group`` (one flat buffer each). The loss is already divided by the
   global token count, so the sum is the gradient of the global mean. Expert grads need no
   sum over EP: the token exchange's backward already brought every EP rank's tokens' share
   to the rank that holds the expert. Summing them over ``dp_group`` would add rank 1's expert
   2 into rank 0's expert 0.
2. **Sequence-parallel grads**: params marked ``sequence_parallel`` (norm weights under SP) saw
   only this rank's sequence slice; their grads are summed over ``tp_group``.
3. **Grad norm** (``grad_norm``), each parameter counted once over the whole job: a dense param
   contributes its squares on every TP rank if TP-sharded (``tensor_model_parallel``), else on
   TP rank 0 only, summed over ``tp_group``; an expert param the same over ``expert_tp_group``,
   then summed over ``ep_group`` (the ranks holding the other experts). DP and expert-DP
   replicas hold identical grads after rule 1 and are not summed. The two partial sums add up
   to the global squared norm, identical on every rank, so clipping scales every rank alike.
5. **Learnable quantization scales** shared over TP (``tp_grad_sum``) are summed over
   ``tp_group`` (the expert-TP group for experts): each rank only saw its shard's share.
   The rules, and the one exception, are written out in :mod:`megaquant.train.learnable`.
4. **No missing grads**: a trainable param without a grad (an expert that got no token in a
   module that skips empty experts, a frozen branch) gets a zero grad before the sums, as in
   Megatron's grad buffers. Every rank then all-reduces buffers of the same layout whatever the
   routing did (no hang, no size mismatch), and AdamW steps every param the same way at any
   layout (weight decay and moment decay included).

Optimizer state is plain per-param tensors shaped like the params, which is what lets
:mod:`megaquant.train.state` save it through the same sharded descriptions as the weights and
reshard it with them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaquant.train.config import OptimConfig


def build_optimizer(model: nn.Module, optim: OptimConfig,
                    scale_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable params; no weight decay on 1-D params (norms, biases).

    Learnable quantization scales (``quant_scale``, megaquant.train.learnable) get a group of
    their own: no weight decay, learning rate ``lr * scale_lr_scale`` (kept by ``set_lr``).
    """
    decay, no_decay, scales = [], [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            if getattr(p, "quant_scale", False):
                scales.append(p)
            else:
                (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": scales, "weight_decay": 0.0, "lr_scale": scale_lr_scale}]
    # foreach=False: the per-param loop gives the same bits as a single process would, which
    # exact-resume and the parallel tests rely on; speed is the matmuls', not this loop's.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas,
                             eps=optim.eps, foreach=False)


def is_expert_parallel(param: torch.Tensor) -> bool:
    """Megatron's mark for a param that lives on one EP rank only (``allreduce=False``)."""
    return not getattr(param, "allreduce", True)


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat_all_reduce(tensors: list[torch.Tensor], group) -> None:
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _require(group, name: str, what: str):
    if group is None:
        raise ValueError(f"the model has expert-parallel params (EP > 1) but no {name} was "
                         f"given for {what}; pass the ParallelGroups' {name} "
                         "(megaquant.megatron.dist.init_model_parallel)")
    return group


def reduce_gradients(model: nn.Module, *, dp_group, tp_group, expert_dp_group=None,
                     expert_tp_group=None) -> None:
    """Rules 1, 2, 4 and 5 of the module docstring: zero-fill, SP and scale sums, DP sums."""
    params = _trainable(model)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _flat_all_reduce([p.grad for p in params if getattr(p, "sequence_parallel", False)], tp_group)
    # Rule 5: shared learnable quantization scales (megaquant.train.learnable).
    tp_sum = [p for p in params if getattr(p, "tp_grad_sum", False)]
    _flat_all_reduce([p.grad for p in tp_sum if not is_expert_parallel(p)], tp_group)
    if any(is_expert_parallel(p) for p in tp_sum):
        _flat_all_reduce([p.grad for p in tp_sum if is_expert_parallel(p)],
                         _require(expert_tp_group, "expert_tp_group", "the scale grad sum"))
    expert = [p.grad for p in params if is_expert_parallel(p)]
    if expert:
        _flat_all_reduce(expert, _require(expert_dp_group, "expert_dp_group", "the grad sum"))
    _flat_all_reduce([p.grad for p in params if not is_expert_parallel(p)], dp_group)


def _local_squares(params: list[torch.Tensor], tp_group) -> torch.Tensor:
    """Sum of squared grads this rank owns: TP-sharded on every TP rank, replicated on rank 0."""
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.detach().double().pow(2).sum().cpu()
    return sq


def _sum_over(x: torch.Tensor, *groups) -> torch.Tensor:
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(x, group=group)
    return x


def grad_norm(model: nn.Module, tp_group, *, expert_tp_group=None, ep_group=None,
              pp_group=None) -> float:
    """Global L2 norm of the gradients, each parameter counted once (rule 3, module docstring).

    Pipeline parallelism: each stage's sum is added over ``pp_group``; the last stage's copy of
    a tied embedding (Megatron marks it ``shared``) is left to the first stage's.
    """
    params = [p for p in _trainable(model) if not getattr(p, "shared", False)]
    device = next(model.parameters()).device
    dense = [p for p in params if not is_expert_parallel(p)]
    expert = [p for p in params if is_expert_parallel(p)]
    sq = _sum_over(_local_squares(dense, tp_group).to(device), tp_group)
    if expert:
        etp = _require(expert_tp_group, "expert_tp_group", "the grad norm")
        esq = _local_squares(expert, etp).to(device)
        sq = sq + _sum_over(esq, etp, _require(ep_group, "ep_group", "the grad norm"))
    return _sum_over(sq, pp_group).sqrt().item()


def clip_gradients(model: nn.Module, max_norm: float, tp_group, *, expert_tp_group=None,
                   ep_group=None, pp_group=None) -> float:
    """Scale grads so their global norm is at most ``max_norm`` (0: no clipping); returns it."""
    norm = grad_norm(model, tp_group, expert_tp_group=expert_tp_group, ep_group=ep_group,
                     pp_group=pp_group)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
