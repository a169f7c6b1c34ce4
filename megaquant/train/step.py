"""One optimizer step: this rank's micro-batches, the loss (LM and/or distillation), backward,
gradient reduction and clipping, the update.

Data position: the training windows are a fixed list; optimizer step ``k`` uses windows
``k*G .. k*G+G-1`` (mod the list length, ``G`` = global batch). Micro-batch ``j`` of the step
goes to data-parallel rank ``j % dp``. The position is therefore a function of the step
number alone, which makes resuming exact and lets a job resume at another DP size.

Loss scale: each rank sums per-token losses over its micro-batches and divides by the token
count of the whole global batch, so that after the DP gradient *sum* the gradient is that of
the global token mean, whatever the DP size (the same number a single process computes).

Expert parallelism: EP ranks are DP ranks (different micro-batches), and every MoE layer
exchanges tokens over EP in forward and backward, so every DP rank must run the same number of
micro-batches: ``BatchConfig`` refuses a global batch that does not split evenly. Which group
sums which gradient, and how the norm counts experts: :mod:`megaquant.train.optim`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megaquant.train.config import BatchConfig, DistillConfig
from megaquant.train.distill import vocab_parallel_kl
from megaquant.train.optim import clip_gradients, reduce_gradients, set_lr


@dataclass
class StepContext:
    """What every step needs besides the model: groups, data, loss settings."""

    windows: Tensor                     # [N, seq+1] int64 training windows
    batch: BatchConfig
    dp_group: object
    tp_group: object
    distill: DistillConfig = DistillConfig()
    teacher: nn.Module | None = None
    grad_clip: float = 0.0
    precision: str = "32"
    # Expert parallelism (EP > 1): where expert grads are summed and their norm is counted
    # (megaquant/train/optim.py). None is fine for a model without expert-parallel params.
    expert_dp_group: object = None
    expert_tp_group: object = None
    ep_group: object = None
    # Pipeline parallelism (PP > 1): the job's ParallelGroups; steps run through Megatron's
    # schedule (megaquant/train/pipeline_step.py). None: the whole model is on this rank.
    pipeline: object = None

    def with_expert_groups(self, groups) -> "StepContext":
        """This context with the expert groups of ``groups`` (a ``ParallelGroups``)."""
        return dataclasses.replace(self, expert_dp_group=groups.expt_dp_group,
                                   expert_tp_group=groups.expt_tp_group, ep_group=groups.ep_group)


def micro_batches(windows: Tensor, step: int, batch: BatchConfig, dp_rank: int, dp: int
                  ) -> list[Tensor]:
    """This DP rank's micro-batches for optimizer step ``step`` (see the module docstring)."""
    g, mb = batch.global_batch_size, batch.micro_batch_size
    batch.micro_batches_per_rank(dp)  # validates the split
    idx = (torch.arange(g) + step * g) % windows.shape[0]
    chunks = windows[idx].split(mb)
    return [chunks[j] for j in range(dp_rank, len(chunks), dp)]


def _positions(tokens: Tensor) -> Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batch_loss(model: nn.Module, tokens: Tensor, ctx: StepContext) -> Tensor:
    """Sum over tokens of this micro-batch's loss (LM NLL, KL to the teacher, or a mix)."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = _positions(inputs)
    d = ctx.distill
    with _autocast(ctx.precision, tokens.device):
        if not d.enabled:
            return model(inputs, pos, None, labels=labels).float().sum()
        with torch.no_grad():
            teacher_logits = ctx.teacher(inputs, pos, None)
        logits = model(inputs, pos, None)
    return distill_loss(logits, teacher_logits, labels, d, ctx.tp_group)


def distill_loss(logits: Tensor, teacher_logits: Tensor, labels: Tensor, d: DistillConfig,
                 tp_group) -> Tensor:
    """Sum over tokens of ``kl_weight * KL(teacher || student) + lm_weight * NLL``.

    ``logits``/``teacher_logits``: ``[b, s, V/tp]`` (vocab-parallel); ``labels``: ``[b, s]``.
    Shared by the single-stage step and the last pipeline stage (``train/pipeline_distill``).
    """
    loss = d.kl_weight * vocab_parallel_kl(logits, teacher_logits, tp_group,
                                           d.temperature).sum()
    if d.lm_weight:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # [s, b] order as Megatron's loss expects; the cross entropy reduces over tp_group.
        nll = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                           labels.transpose(0, 1).contiguous())
        loss = loss + d.lm_weight * nll.sum()
    return loss


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float,
               ctx: StepContext) -> dict:
    """Run optimizer step ``step``; returns loss (global token mean), grad norm, tokens."""
    dp, dp_rank = dist.get_world_size(ctx.dp_group), dist.get_rank(ctx.dp_group)
    device = next(model.parameters()).device
    mine = micro_batches(ctx.windows, step, ctx.batch, dp_rank, dp)
    seq = ctx.windows.shape[1] - 1
    n_tokens = ctx.batch.global_batch_size * seq
    if ctx.pipeline is not None:
        from megaquant.train.pipeline_step import pipeline_train_step

        return pipeline_train_step(model, optimizer, mine, n_tokens, lr, ctx,
                                   lambda dev: _autocast(ctx.precision, dev))
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for tokens in mine:
        loss = micro_batch_loss(model, tokens.to(device), ctx) / n_tokens
        loss.backward()
        total += loss.detach().double()
    reduce_gradients(model, dp_group=ctx.dp_group, tp_group=ctx.tp_group,
                     expert_dp_group=ctx.expert_dp_group, expert_tp_group=ctx.expert_tp_group)
    norm = clip_gradients(model, ctx.grad_clip, ctx.tp_group, expert_tp_group=ctx.expert_tp_group,
                          ep_group=ctx.ep_group)
    set_lr(optimizer, lr)
    optimizer.step()
    dist.all_reduce(total, group=ctx.dp_group)
    return {"loss": total.item(), "grad_norm": norm, "lr": lr, "tokens": n_tokens}
