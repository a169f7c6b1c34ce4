"""Mixture of experts on CPU/gloo: the router and the alltoall token dispatcher (docs/moe.md).

Measured on megatron-core 0.16.1 with gloo: the allgather token dispatcher runs on CPU as is;
the router and the alltoall dispatcher need the classes below. They are spec choices
(:class:`megaquant.megatron.cpu.spec.CPUSpecProvider` answers ``moe_layer()`` and
``moe_router()`` with them), not global patches.

``CPUTopKRouter``
    replaces ``TopKRouter.gating``, which moves the router weight to
    ``torch.cuda.current_device()`` and, without TE, fails on ``te_general_gemm``: a plain
    ``F.linear`` in the router dtype. Routing itself is Megatron's.
``CPUMoELayer`` + ``CPUAlltoAllTokenDispatcher``
    the alltoall dispatcher creates a ``torch.cuda.Stream()`` when built, keeps split sizes as
    tensors that gloo's ``all_to_all_single`` refuses, and over expert-TP moves an uneven
    number of tokens per rank: an uneven all-gather in ``dispatch_postprocess`` and, in the
    backward of ``combine_preprocess``'s uneven reduce-scatter, another one. gloo has no
    uneven all_gather; both are one ``all_to_all_single`` (``_UnevenAllGather``,
    ``_UnevenReduceScatter``). The only patches are Megatron names swapped inside context
    managers while a constructor, ``dispatch_postprocess`` or ``combine_preprocess`` runs.
    The allgather dispatcher needs nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings as mcore_mappings
from megatron.core.transformer.moe import moe_layer as mcore_moe_layer
from megatron.core.transformer.moe import token_dispatcher as mcore_dispatch
from megatron.core.transformer.moe.router import TopKRouter


class CPUTopKRouter(TopKRouter):
    """``TopKRouter`` whose gate is a plain ``F.linear``; same routing, same parameters.

    Megatron's ``gating`` moves the router weight to ``torch.cuda.current_device()`` and runs a
    custom autograd GEMM that, without TE, names ``te_general_gemm`` and fails. The router
    score is one small linear in ``moe_router_dtype`` (fp32/fp64 when set): we compute exactly
    that. Routers stay unquantized (recipes exclude ``*router*``).
    """

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)


def _all_gather_uneven(input_: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``input_`` (rank r holds ``sizes[r]`` rows) along dim 0.

    gloo's ``all_gather`` wants equal shapes ("invalid tensor size"); ``all_to_all_single``
    takes per-rank split sizes. So each rank sends its whole input to every rank and receives
    ``sizes[r]`` rows from rank r: the all-gather, in one collective.
    """
    world = torch.distributed.get_world_size(group)
    n = input_.shape[0]
    out = input_.new_empty((sum(sizes), *input_.shape[1:]))
    send = torch.cat([input_.contiguous()] * world)
    torch.distributed.all_to_all_single(out, send, sizes, [n] * world, group=group)
    return out


class _UnevenAllGather(torch.autograd.Function):
    """All-gather along dim 0 with per-rank sizes, as one ``all_to_all_single`` (gloo has no
    uneven all_gather). Backward sends each rank the gradient of its own slice, summed."""

    @staticmethod
    def forward(ctx, input_, group, output_split_sizes):
        ctx.group, ctx.sizes, ctx.n = group, list(output_split_sizes), input_.shape[0]
        return _all_gather_uneven(input_, group, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        world = torch.distributed.get_world_size(ctx.group)
        got = grad.new_empty((ctx.n * world, *grad.shape[1:]))
        torch.distributed.all_to_all_single(got, grad.contiguous(), [ctx.n] * world, ctx.sizes,
                                            group=ctx.group)
        return got.view(world, ctx.n, *grad.shape[1:]).sum(0), None, None


def _gather_uneven_ok(original):
    """``gather_from_sequence_parallel_region`` routing uneven gathers to ``_UnevenAllGather``."""

    def gather(input_, tensor_parallel_output_grad=True, group=None, output_split_sizes=None,
               use_global_buffer=False):
        if output_split_sizes is None or group is None or group.size() == 1:
            return original(input_, tensor_parallel_output_grad, group, output_split_sizes,
                            use_global_buffer)
        return _UnevenAllGather.apply(input_, group, [int(s) for s in output_split_sizes])

    return gather


class _UnevenReduceScatter(torch.autograd.Function):
    """Reduce-scatter along dim 0 with per-rank sizes; its backward is the uneven all-gather.

    Forward: Megatron's own ``_reduce_scatter_along_first_dim`` (gloo's ``reduce_scatter``
    takes a list of unequal chunks, so the forward already works on CPU). Backward: rank r's
    output is the sum over ranks of rows ``sizes[r]`` of their inputs, so every rank's input
    gradient is the concatenation of all ranks' output gradients. Megatron computes that with
    an uneven ``all_gather``, which gloo refuses ("ProcessGroupGloo::allgather: invalid tensor
    size"); here it is ``_all_gather_uneven``, one ``all_to_all_single``.
    """

    @staticmethod
    def forward(ctx, input_, group, input_split_sizes):
        ctx.group, ctx.sizes = group, list(input_split_sizes)
        return mcore_mappings._reduce_scatter_along_first_dim(input_, group, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_uneven(grad, ctx.group, ctx.sizes), None, None


def _reduce_scatter_uneven_ok(original):
    """``reduce_scatter_to_sequence_parallel_region`` that routes uneven reduce-scatters to
    ``_UnevenReduceScatter``."""

    def reduce_scatter(input_, group=None, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        return _UnevenReduceScatter.apply(input_, group, [int(s) for s in input_split_sizes])

    return reduce_scatter


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


class CPUAlltoAllTokenDispatcher(mcore_dispatch.MoEAlltoAllTokenDispatcher):
    """The alltoall token dispatcher on CPU/gloo; same token order, same results.

    Three CUDA/NCCL assumptions of the parent, each handled here:

    * its constructor creates a class-wide ``torch.cuda.Stream()`` for device-to-host copies:
      we construct it with a placeholder in that class attribute (restored afterwards);
    * it keeps split sizes as tensors/NumPy arrays copied on that stream; gloo's
      ``all_to_all_single`` wants Python lists, so ``_maybe_dtoh_and_synchronize`` converts
      them (everything already lives on the CPU, no stream or event is needed);
    * with expert-TP > 1 it moves an uneven number of tokens per TP rank with collectives
      gloo cannot do unevenly: the all-gather of ``dispatch_postprocess`` goes through
      ``_UnevenAllGather``, and the reduce-scatter of ``combine_preprocess`` through
      ``_UnevenReduceScatter`` (same forward; its backward is an uneven all-gather). Each
      name is swapped only while that method runs.
    """

    def __init__(self, *args, **kwargs):
        base = mcore_dispatch.MoEAlltoAllTokenDispatcher
        with _patched(base, "cuda_dtoh_stream", base.cuda_dtoh_stream or object()):
            super().__init__(*args, **kwargs)

    @staticmethod
    def _as_list(value):
        return value.tolist() if hasattr(value, "tolist") else value

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            self.input_splits = self._as_list(self.input_splits)
            self.output_splits = self._as_list(self.output_splits)
            self.output_splits_tp = (None if self.output_splits_tp is None
                                     else torch.as_tensor(self.output_splits_tp))
            if torch.is_tensor(self.num_out_tokens):
                self.num_out_tokens = int(self.num_out_tokens)
        return tokens_per_expert

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        gather = _gather_uneven_ok(mcore_dispatch.gather_from_sequence_parallel_region)
        with _patched(mcore_dispatch, "gather_from_sequence_parallel_region", gather):
            return super().dispatch_postprocess(global_input_tokens, global_probs)

    def combine_preprocess(self, hidden_states):
        original = mcore_dispatch.reduce_scatter_to_sequence_parallel_region
        scatter = _reduce_scatter_uneven_ok(original)
        with _patched(mcore_dispatch, "reduce_scatter_to_sequence_parallel_region", scatter):
            return super().combine_preprocess(hidden_states)


class CPUMoELayer(mcore_moe_layer.MoELayer):
    """``MoELayer`` whose alltoall dispatcher is :class:`CPUAlltoAllTokenDispatcher`.

    ``MoELayer.__init__`` picks its dispatcher class by name from its own module; while it runs
    we point that name at the CPU dispatcher (restored on every exit path). The allgather
    dispatcher needs nothing and is left alone.
    """

    def __init__(self, *args, **kwargs):
        with _patched(mcore_moe_layer, "MoEAlltoAllTokenDispatcher", CPUAlltoAllTokenDispatcher):
            super().__init__(*args, **kwargs)
