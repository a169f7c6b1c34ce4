"""Held-out loss and calibration forwards for a Megatron ``GPTModel``, data-parallel aware.

Batch distribution: batch ``i`` goes to data-parallel rank ``i % dp_size``. Every rank of one
tensor-parallel group has the same DP rank, so TP peers see the same tokens (they must: their
collectives pair up). Ranks may process different numbers of batches; nothing is reduced over
DP until the end.

Loss: the mean next-token negative log-likelihood over all predicted tokens of all batches
(token-weighted, not a mean of batch means). GPTModel's forward with ``labels`` returns the
per-token loss, computed under TP by vocab-parallel cross entropy over the sharded logits.
The (sum, count) pair is summed over ``dp_group`` in float64, so every rank returns the same
number regardless of how the batches were split.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from megaquant.util import is_rank0


def _my_batches(batches: Sequence[Tensor], dp_group) -> list[Tensor]:
    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    return [batches[i] for i in range(rank, len(batches), size)]


def _progress(items: list, desc: str):
    # One bar for the job, not one per rank.
    return tqdm(items, desc=desc, disable=not is_rank0(), leave=False)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_last_stage(model: torch.nn.Module) -> None:
    if not getattr(model, "post_process", True):
        raise ValueError("evaluate_loss needs the model's output layer: a pipeline stage is "
                         "evaluated through the schedule, use "
                         "megaquant.megatron.pipeline.pipeline_evaluate_loss")


def _check_tokens(tokens: Tensor) -> None:
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise TypeError(f"batches must be [batch, seq] int64 token tensors, got "
                        f"{tuple(tokens.shape)} {tokens.dtype}")


def _positions(tokens: Tensor) -> Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Sequence[Tensor], dp_group) -> float:
    """Mean next-token NLL (nats per token) of ``batches``, identical on every rank.

    Each batch is ``[b, s]`` int64 tokens; the model sees ``tokens[:, :-1]`` and is scored on
    ``tokens[:, 1:]``. Under sequence parallelism ``s - 1`` must be divisible by the TP size.
    """
    _check_last_stage(model)
    was_training = model.training
    model.eval()
    device = _model_device(model)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of NLL, token count)
    try:
        for tokens in _progress(_my_batches(batches, dp_group), "eval loss"):
            _check_tokens(tokens)
            tokens = tokens.to(device)
            inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            per_token = model(inputs, _positions(inputs), None, labels=labels)  # [b, s-1]
            totals[0] += per_token.double().sum()
            totals[1] += per_token.numel()
    finally:
        model.train(was_training)
    dist.all_reduce(totals, group=dp_group)
    if totals[1] == 0:
        raise ValueError("evaluate_loss got no tokens: pass at least one batch of length >= 2")
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def run_forward(model: torch.nn.Module, batches: Sequence[Tensor], desc: str = "forward",
                dp_group=None) -> int:
    """Forward each of this DP rank's batches (e.g. to let calibrators observe activations).

    Returns how many batches this rank ran. ``dp_group`` defaults to Megatron's data-parallel
    group (the caller's outermost layer set it up).
    """
    if dp_group is None:
        from megatron.core import parallel_state

        dp_group = parallel_state.get_data_parallel_group()
    was_training = model.training
    model.eval()
    device = _model_device(model)
    mine = _my_batches(batches, dp_group)
    try:
        for tokens in _progress(mine, desc):
            _check_tokens(tokens)
            tokens = tokens.to(device)
            model(tokens, _positions(tokens), None)
    finally:
        model.train(was_training)
    return len(mine)
