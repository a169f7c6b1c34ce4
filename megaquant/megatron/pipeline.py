"""Forward passes of a pipeline-parallel model through Megatron's pipeline schedule.

Under pipeline parallelism (``parallel.pp > 1``) no rank holds the whole model: stage 0 embeds,
the middle stages run their layers, the last stage computes logits and the loss. Evaluation and
calibration therefore run through Megatron's schedule (``get_forward_backward_func``, forward
only): each data-parallel rank's batches are the micro-batches, every stage calls the same
``forward_step`` on them, and activations travel between stages by Megatron's p2p helpers
(``P2PCommunicator`` on the pipeline group given here, not looked up).

Batch distribution over data parallelism is the one of ``megaquant.evaluate`` (batch ``i`` to
DP rank ``i % dp``), so a PP=2 run sees exactly the batches of a PP=1 run. The loss is the same
token-weighted mean: the last stage sums (NLL, token count) in float64, the pair is summed over
DP and broadcast from the last stage over the pipeline group, so every rank reports the same
number. Runs without autograd (``torch.no_grad``): no activation or dequantized weight is kept.

Calibration needs nothing more: each quantizer lives in its layer, on that layer's stage, and
sees that layer's inputs when the schedule runs it. PP never shares a layer between ranks, so
the amax synchronisation rules (over TP/DP/EP peers, ``megaquant.calib.sync``) are unchanged.

On CPU the schedule runs inside ``cpu.pipeline.cpu_schedule_stand_ins`` (see there).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megaquant.megatron.cpu.pipeline import cpu_schedule_stand_ins


def _positions(tokens: Tensor) -> Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _my_batches(batches: Sequence[Tensor], dp_group) -> list[Tensor]:
    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    return [batches[i] for i in range(rank, len(batches), size)]


def _runs_of_equal_shape(batches: list[Tensor]) -> list[list[Tensor]]:
    """The schedule sends fixed-shape activations: a shorter last batch gets its own run."""
    return [list(run) for _, run in itertools.groupby(batches, key=lambda b: tuple(b.shape))]


def run_schedule(model, micro_batches: list[Tensor], groups, step, *, seq_length: int,
                 forward_only: bool = True, streams: int = 1) -> list:
    """Run ``micro_batches`` ([b, s] int64 tokens, one shape) through Megatron's schedule.

    ``step(model, tokens)`` runs the model on one micro-batch and returns ``(output,
    loss_func)`` as Megatron's ``forward_step_func`` does; ``seq_length`` is the length of the
    sequences the model sees (the activations sent between stages). ``streams``: how many
    activations of shape ``[s, b, h]`` travel together, stacked along the batch dimension (2
    for a distillation pair: the student's and the teacher's, ``train/pipeline_distill.py``).
    Returns the last stage's collected loss records (empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if not micro_batches:
        return []
    b = micro_batches[0].shape[0]
    device = next(model.parameters()).device
    data = iter([t.to(device) for t in micro_batches])

    def forward_step(data_iterator, model_chunk):
        return step(model_chunk, next(data_iterator))

    schedule = get_forward_backward_func(pp_size=groups.pp)
    with cpu_schedule_stand_ins():
        return schedule(
            forward_step_func=forward_step, data_iterator=data, model=[model],
            num_microbatches=len(micro_batches), seq_length=seq_length,
            micro_batch_size=b * streams,
            forward_only=forward_only,
            p2p_communicator=P2PCommunicator(pp_group=groups.pp_group, config=model.config),
            pg_collection=groups.pg_collection,
        )


def _eval_step(model, tokens: Tensor):
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    out = model(inputs, _positions(inputs), None, labels=labels)

    def loss_func(per_token: Tensor):
        record = {"nll": per_token.double().sum(), "count": per_token.numel()}
        return per_token.sum().clone(), record

    return out, loss_func


def _calib_step(model, tokens: Tensor):
    out = model(tokens, _positions(tokens), None)
    return out, lambda output: (output.sum() * 0, {})


def _from_last_stage(totals: Tensor, groups) -> Tensor:
    """Sum over DP, then every stage receives the last stage's numbers."""
    dist.all_reduce(totals, group=groups.dp_group)
    last = dist.get_global_rank(groups.pp_group, groups.pp - 1)
    dist.broadcast(totals, src=last, group=groups.pp_group)
    return totals


@torch.no_grad()
def pipeline_evaluate_loss(model, batches: Sequence[Tensor], groups) -> float:
    """Mean next-token NLL of ``batches`` ([b, s+1] tokens), identical on every rank."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    try:
        for run in _runs_of_equal_shape(_my_batches(batches, groups.dp_group)):
            for record in run_schedule(model, run, groups, _eval_step,
                                       seq_length=run[0].shape[1] - 1):
                totals[0] += record["nll"]
                totals[1] += record["count"]
    finally:
        model.train(was_training)
    _from_last_stage(totals, groups)
    if totals[1] == 0:
        raise ValueError("evaluate_loss got no tokens: pass at least one batch of length >= 2")
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def pipeline_run_forward(model, batches: Sequence[Tensor], groups) -> int:
    """Forward this DP rank's ``batches`` through every stage (calibrators observe them)."""
    was_training = model.training
    model.eval()
    mine = _my_batches(batches, groups.dp_group)
    try:
        for run in _runs_of_equal_shape(mine):
            run_schedule(model, run, groups, _calib_step, seq_length=run[0].shape[1])
    finally:
        model.train(was_training)
    return len(mine)
