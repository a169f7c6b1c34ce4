"""Quantized core attention: K and V quantizers on the tensors an engine writes into its KV cache.

Megatron's ``Attention.forward`` projects Q/K/V (``linear_qkv``), applies RoPE to Q and K, and
calls ``core_attention(query, key, value, attention_mask, ...)`` with ``[s, b, heads, head_dim]``
tensors of this TP rank (K/V carry the rank's query groups). That call is where the keys (after
RoPE) and the values are what an engine would store, so the quantized core attention
fake-quantizes ``key`` with ``k_quantizer`` and ``value`` with ``v_quantizer`` and hands them to
the parent's forward, unchanged otherwise. No query quantizer: the engines keep Q in the model's
dtype when the cache is FP8 or NVFP4 (vLLM and TensorRT-LLM dequantize K/V inside the kernel).

With a KV cache at inference (Megatron's ``inference_context``) the cache holds the unquantized
K/V and the core attention fake-quantizes what it reads back: with a static per-tensor scale
that is the same numbers as quantizing on write (fake quantization is idempotent on its grid).

Parallel rule (beside the code, read by :mod:`megaquant.calib.sync`): heads are split over TP,
so no amax axis is a partition axis (``partition_axes`` None) and the per-layer K and V amax is
MAX-reduced over TP, then over DP: every rank ends with the scale one process computes, and the
amax is replicated over TP in checkpoints. Context parallelism does not exist here.

How they enter a model: by conversion only (:func:`megaquant.quantize` converts the core
attention of a spec-built model too), and only for a recipe with a ``kv_cache:`` section, so
models quantized without one keep exactly the state (and state-dict keys) they had before.

Which core attentions are known: Megatron's local ``DotProductAttention`` (GPU, local spec) and
megaquant's CPU ``SDPAttention``. Conversion refuses any other core attention by name when a
recipe has a ``kv_cache:`` section (:mod:`megaquant.convert`), rather than leaving the cache
silently unquantized.
"""

from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention

from megaquant.megatron.cpu.attention import SDPAttention
from megaquant.nn.base import QuantModuleMixin
from megaquant.quantizer import TensorQuantizer

KV_ROLES = ("k", "v")


class QuantCoreAttentionMixin(QuantModuleMixin):
    """Adds ``k_quantizer`` / ``v_quantizer`` to a core attention (see the module docstring)."""

    partition_axes = {"k": None, "v": None}  # heads are split over TP: amax MAX-reduced over TP

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers()

    def _setup_quantizers(self) -> None:
        for role in KV_ROLES:
            setattr(self, f"{role}_quantizer", TensorQuantizer())

    def forward(self, query, key, value, *args, **kwargs):
        return super().forward(query, self.k_quantizer(key), self.v_quantizer(value),
                               *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._shard_quantizer_state(sharded, prefix, sharded_offsets, metadata)


class QuantDotProductAttention(QuantCoreAttentionMixin, DotProductAttention):
    """Megatron's local ``DotProductAttention`` with K/V quantizers (same constructor)."""


class QuantSDPAttention(QuantCoreAttentionMixin, SDPAttention):
    """megaquant's CPU ``SDPAttention`` with K/V quantizers (same constructor)."""


CORE_ATTENTION_WRAPPERS = {DotProductAttention: QuantDotProductAttention,
                           SDPAttention: QuantSDPAttention}
