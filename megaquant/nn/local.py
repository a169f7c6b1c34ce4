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

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megaquant.nn.base import QuantModuleMixin


class _QuantParallelLinear(QuantModuleMixin):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers()

    def _forward_impl(self, input, weight, *args, **kwargs):
        out = super()._forward_impl(
            self.input_quantizer(input), self.weight_quantizer(weight), *args, **kwargs
        )
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
