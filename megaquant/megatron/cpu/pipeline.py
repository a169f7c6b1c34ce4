"""CPU stand-ins for Megatron's pipeline-parallel code (schedules, p2p, tied embeddings).

Megatron-Core 0.16.1 runs its pipeline schedule on CUDA only in three places; each stand-in is
scoped to a ``with`` block, installed only when CUDA is unavailable, restored on every exit:

``schedules.torch`` -> a view of ``torch`` whose ``zeros(..., device="cuda")`` allocates on
    the CPU (:func:`cpu_schedule_stand_ins`). The schedules count tokens in
    ``torch.zeros([], device="cuda")`` (a string, which the ``current_device`` stand-in cannot
    reach). Only the ``torch`` name inside ``megatron.core.pipeline_parallel.schedules`` is
    swapped; everything else is the real module.
p2p ``torch.cuda.synchronize`` after batched send/receive: avoided, not patched. The jobs set
    ``batch_p2p_comm=False`` (gloo has no coalesced p2p), so Megatron's p2p helpers pair plain
    ``isend``/``irecv`` calls (even ranks send first) and never synchronize. Their receive
    buffers are allocated on ``torch.cuda.current_device()``: the runtime's CPU stand-in.
``Tensor.cuda`` -> identity (:func:`cpu_tied_embedding_stand_in`), while a pipeline stage
    with tied embeddings is constructed: ``LanguageModule.setup_embeddings_and_output_layer``
    moves the shared weight with ``weight.data.cuda()`` before all-reducing it over the
    embedding group (first and last stage). On CPU the weight stays where it is.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch


class _CPUTorch(types.ModuleType):
    """``torch`` as seen by the schedules module on CPU: ``device="cuda"`` means the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device is not None and str(device).startswith("cuda"):
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


@contextlib.contextmanager
def cpu_schedule_stand_ins() -> Iterator[None]:
    """While a Megatron pipeline schedule runs on CPU: its ``torch`` allocates ``cuda`` on CPU."""
    from megatron.core.pipeline_parallel import schedules

    if torch.cuda.is_available():
        yield
        return
    saved = schedules.torch
    schedules.torch = _CPUTorch()
    try:
        yield
    finally:
        schedules.torch = saved


@contextlib.contextmanager
def cpu_tied_embedding_stand_in() -> Iterator[None]:
    """While a tied-embedding pipeline stage is built on CPU: ``Tensor.cuda`` returns the tensor."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved
