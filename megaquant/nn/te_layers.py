"""Quantized subclasses of Megatron-Core's Transformer Engine layers (imported only with TE).

Each class is the Megatron TE class plus a mixin from :mod:`megaquant.nn.te_mixins`: the forward
runs TE's own fused forward while TE's autograd function (``_Linear``, ``_LayerNormLinear``,
``_GroupedLinear``) is briefly replaced by a stand-in that fake-quantizes the GEMM operands,
found by parameter name in the original function's signature. Constructors are the parents'
(same keywords: ``config``, ``init_method``, ``bias``, ...); ``forward`` returns
``(output, bias)`` like the parents.

``TE_WRAPPERS`` pairs each Megatron TE class with its quantized subclass for in-place conversion
(:func:`megaquant.nn.registry.register_builtins` registers them). Building or converting a layer
resolves the operand positions against the installed TE, so an unsupported TE fails right there.

This module imports TE-dependent Megatron modules at the top: only import it where
``transformer_engine`` imports (``megaquant.nn.registry.register_builtins`` does the check).
"""

from __future__ import annotations

from megatron.core.extensions.transformer_engine import (
    HAVE_TE,
    TEColumnParallelGroupedLinear,
    TEColumnParallelLinear,
    TEDotProductAttention,
    TELayerNormColumnParallelLinear,
    TELinear,
    TERowParallelGroupedLinear,
    TERowParallelLinear,
)

from megaquant.nn.attention import QuantCoreAttentionMixin
from megaquant.nn.te_mixins import (
    QuantTEGroupedLinearMixin,
    QuantTELayerNormLinearMixin,
    QuantTELinearMixin,
)

if not HAVE_TE:  # megatron swaps TE for a MagicMock when `import transformer_engine` fails
    raise ImportError(
        "megaquant.nn.te_layers needs Transformer Engine, but megatron.core could not import it; "
        "run `python -c 'import transformer_engine.pytorch'` to see why"
    )


class QuantTELinear(QuantTELinearMixin, TELinear):
    """``TELinear`` (``parallel_mode`` None or "duplicated") with input/weight/output quantizers."""

    partition_axes = {"input": None, "weight": None, "output": None}


class QuantTEColumnParallelLinear(QuantTELinearMixin, TEColumnParallelLinear):
    """``TEColumnParallelLinear`` with input/weight/output quantizers."""

    # weight [out/tp, in] split along outputs; output [s, b, out/tp] along the last dim.
    partition_axes = {"input": None, "weight": 0, "output": -1}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._shard_quantizer_state(sharded, prefix, sharded_offsets, metadata)


class QuantTERowParallelLinear(QuantTELinearMixin, TERowParallelLinear):
    """``TERowParallelLinear`` with input/weight/output quantizers.

    The output quantizer sees the TP-reduced output (TE reduces inside ``_Linear``).
    """

    partition_axes = {"input": -1, "weight": 1, "output": None}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._shard_quantizer_state(sharded, prefix, sharded_offsets, metadata)


class QuantTELayerNormColumnParallelLinear(
    QuantTELayerNormLinearMixin, TELayerNormColumnParallelLinear
):
    """``TELayerNormColumnParallelLinear`` with quantizers; see the mixin for the two routes."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._shard_quantizer_state(sharded, prefix, sharded_offsets, metadata)


class QuantTEColumnParallelGroupedLinear(
    QuantTEGroupedLinearMixin, TEColumnParallelGroupedLinear
):
    """``TEColumnParallelGroupedLinear`` with one weight quantizer per local expert."""

    partition_axes = {"input": None, "weight": 0, "output": -1}


class QuantTERowParallelGroupedLinear(QuantTEGroupedLinearMixin, TERowParallelGroupedLinear):
    """``TERowParallelGroupedLinear`` with one weight quantizer per local expert."""

    partition_axes = {"input": -1, "weight": 1, "output": None}


# Megatron TE class -> quantized subclass, registered by megaquant.nn.registry.register_builtins.
class QuantTEDotProductAttention(QuantCoreAttentionMixin, TEDotProductAttention):
    """Megatron's ``TEDotProductAttention`` with K/V quantizers on the tensors its ``forward``
    receives (keys after RoPE, values), found by name; TE's attention kernel is untouched.
    Converted only for recipes with a ``kv_cache:`` section (megaquant.convert)."""


TE_WRAPPERS = {
    TELinear: QuantTELinear,
    TEColumnParallelLinear: QuantTEColumnParallelLinear,
    TERowParallelLinear: QuantTERowParallelLinear,
    TELayerNormColumnParallelLinear: QuantTELayerNormColumnParallelLinear,
    TEColumnParallelGroupedLinear: QuantTEColumnParallelGroupedLinear,
    TERowParallelGroupedLinear: QuantTERowParallelGroupedLinear,
    TEDotProductAttention: QuantTEDotProductAttention,
}
