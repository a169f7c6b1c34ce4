"""Quantized subclasses of Megatron-Core's local tensor-parallel linears.

Both parents route their GEMM through ``self._forward_impl(input=..., weight=..., ...)``; the
subclasses quantize those two operands there and call the parent's ``_forward_impl``. Everything
else (the ``(output, bias)`` return, gather/scatter, sequence parallelism, bias handling, the
state dict) is the parent's, untouched.

Where the quantization happens matters under sequence parallelism: a column-parallel layer's
``input`` reaches ``_forward_impl`` *before* the all-gather over the sequence dimension (the gather
runs inside Megatron's autograd function). Quantizing the local sequence shard is equivalent to
quantizing the gathered tensor because (a) per-tensor amax is shared over the TP group by
calibration (megaquant.calib.sync) and (b) block formats use blocks along the hidden (last)
dimension, which sequence parallelism does not split.

The output quantizer (off by default) fake-quantizes this rank's partial result, before any
tensor-parallel reduction.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megaquant.nn.base import QuantModuleMixin


class _RecomputeWeight:
    """What autograd keeps instead of a fake-quantized weight: how to make it again."""

    __slots__ = ("quantizer", "weight")

    def __init__(self, quantizer, weight):
        self.quantizer, self.weight = quantizer, weight

    def __call__(self):
        with torch.no_grad():
            return self.quantizer(self.weight)


def _recompute_saved_weight(quantizer, weight, qweight):
    """Make Megatron's linear save a recipe for ``qweight`` instead of ``qweight`` itself.

    Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` saves the weight it receives
    for the input-gradient GEMM. Unquantized, that is the parameter (no extra memory); fake-
    quantized, it is a new full-precision tensor per layer that would live until backward: an
    extra copy of every weight during training. Inside this context the saved-tensor hook
    swaps that one tensor for a handle that fake-quantizes the parameter again when backward
    unpacks it (the same deterministic function of the same weight and amax, so the same bits:
    the optimizer only changes weights after backward). Everything else is saved as usual.
    Costs one extra weight fake-quantization per layer per backward.
    """
    if qweight is weight or not torch.is_grad_enabled():
        return contextlib.nullcontext()

    # Only plain values in the closure: autograd keeps the pack hook with every saved
    # tensor, and a reference to qweight here would keep the very copy we mean to free.
    target = (qweight.data_ptr(), tuple(qweight.shape), qweight.dtype)

    def pack(t):
        if (t.data_ptr(), tuple(t.shape), t.dtype) == target:
            return _RecomputeWeight(quantizer, weight)
        return t

    def unpack(saved):
        return saved() if isinstance(saved, _RecomputeWeight) else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _QuantParallelLinear(QuantModuleMixin):
    # An online transform of the input, applied before the input quantizer (None: none). Set by
    # calib/block_hadamard.py, which folds its inverse into the weight: ``x W^T = (x H)(W H)^T``
    # for an orthogonal H. It acts on blocks of the last dim, which TP and SP never straddle.
    # A plain callable, not an nn.Module (a submodule would be shadowed by this class attribute).
    input_transform = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers()

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.input_transform is not None:
            input = self.input_transform(input)
        qweight = self.weight_quantizer(weight)
        with _recompute_saved_weight(self.weight_quantizer, weight, qweight):
            out = super()._forward_impl(self.input_quantizer(input), qweight, *args, **kwargs)
        return self.output_quantizer(out)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._shard_quantizer_state(sharded, prefix, sharded_offsets, metadata)


class QuantColumnParallelLinear(_QuantParallelLinear, ColumnParallelLinear):
    """``ColumnParallelLinear`` with input/weight/output quantizers (same constructor)."""

    # weight [out/tp, in]: split along outputs; output [s, b, out/tp]: split along the last dim.
    partition_axes = {"input": None, "weight": 0, "output": -1}


class QuantRowParallelLinear(_QuantParallelLinear, RowParallelLinear):
    """``RowParallelLinear`` with input/weight/output quantizers (same constructor)."""

    # weight [out, in/tp] and input [s, b, in/tp]: split along the input (last) dim. The output
    # quantizer sees this rank's partial sum, which no axis partitions: reduced over TP.
    partition_axes = {"input": -1, "weight": 1, "output": None}
