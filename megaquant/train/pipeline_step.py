"""One optimizer step of a pipeline-parallel model (``parallel.pp > 1``), through Megatron's
pipeline schedule (forward and backward, 1F1B).

Same contract as :func:`megaquant.train.step.train_step`: the same micro-batches per DP rank,
the loss of each micro-batch summed over tokens and divided by the global batch's token count,
grads summed over DP (and TP for sequence-parallel params), clipped by one global norm. What
pipeline parallelism adds:

* The schedule runs ``forward_step`` on every stage; only the last stage has a loss. Megatron
  divides a ``(loss, record)`` loss by the number of micro-batches; ``_lm_step`` multiplies
  it back so the gradient is exactly that of the global token mean.
* Tied embeddings span the first and last stage (DECISIONS "Tied embeddings"): the first stage's
  embedding and the last stage's output weight are one parameter in two places. Their grads
  are summed over Megatron's embedding group (``model.embd_group``, first and last stage), so
  both copies take the same update and stay identical.
* Grad norm: each stage's squared norm is summed over the pipeline group; the last stage's copy
  of a tied weight (Megatron marks it ``shared``) is counted once, on the first stage.
* The loss is reduced on the last stage and broadcast, so every rank logs the same number.

Distillation (QAD): the teacher is staged like the student and its activations travel with
the student's (``train/pipeline_distill.py``, which also says why this design).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megaquant.megatron.pipeline import run_schedule
from megaquant.train.optim import clip_gradients, reduce_gradients, set_lr


def _lm_step(n_tokens: int, k: int, precision_ctx):
    def step(model, tokens: Tensor):
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        pos = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
        with precision_ctx(tokens.device):
            per_token = model(inputs, pos, None, labels=labels)

        def loss_func(out: Tensor):
            loss = out.float().sum() / n_tokens
            return loss * k, {"loss": loss.detach().double()}  # the schedule divides by k

        return per_token, loss_func

    return step


def reduce_tied_embedding_grad(model: nn.Module) -> None:
    """Sum the grads of a tied embedding/output weight over Megatron's embedding group."""
    if not getattr(model, "share_embeddings_and_output_weights", False):
        return
    if not (model.pre_process or model.post_process) or model.embd_group is None:
        return
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=model.embd_group)


def pipeline_train_step(model: nn.Module, optimizer, mine: list[Tensor], n_tokens: int,
                        lr: float, ctx, precision_ctx) -> dict:
    """Run one step on this DP rank's micro-batches ``mine``; see the module docstring."""
    groups = ctx.pipeline
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    runner, step, streams = model, _lm_step(n_tokens, len(mine), precision_ctx), 1
    if ctx.distill.enabled:
        from megaquant.train.pipeline_distill import DistillPair, distill_step

        runner, streams = DistillPair(model, ctx.teacher).train(), 2
        step = distill_step(n_tokens, len(mine), ctx, precision_ctx)
    records = run_schedule(runner, mine, groups, step, seq_length=ctx.windows.shape[1] - 1,
                           forward_only=False, streams=streams)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for record in records:
        total += record["loss"]
    reduce_gradients(model, dp_group=ctx.dp_group, tp_group=ctx.tp_group,
                     expert_dp_group=ctx.expert_dp_group, expert_tp_group=ctx.expert_tp_group)
    reduce_tied_embedding_grad(model)
    norm = clip_gradients(model, ctx.grad_clip, ctx.tp_group, expert_tp_group=ctx.expert_tp_group,
                          ep_group=ctx.ep_group, pp_group=groups.pp_group)
    set_lr(optimizer, lr)
    optimizer.step()
    dist.all_reduce(total, group=ctx.dp_group)
    dist.broadcast(total, src=dist.get_global_rank(groups.pp_group, groups.pp - 1),
                   group=groups.pp_group)
    return {"loss": total.item(), "grad_norm": norm, "lr": lr, "tokens": n_tokens}
