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

Which core attentions are known: Megatron's local ``DotProductAttention`` (GPU, local spec),
megaquant's CPU ``SDPAttention`` and, where TE is installed, Megatron's ``TEDotProductAttention``
(:mod:`megaquant.nn.te_layers`). ``key`` and ``value`` are found by name in the parent's
``forward`` signature (:meth:`QuantCoreAttentionMixin.kv_positions`); Megatron's
``TEDotProductAttention.forward`` is in the Megatron contract, so ``megaquant doctor`` checks a
release for them. Conversion refuses any other core attention by name when a
recipe has a ``kv_cache:`` section (:mod:`megaquant.convert`), rather than leaving the cache
silently unquantized.
"""

from __future__ import annotations

import inspect

from megatron.core.transformer.dot_product_attention import DotProductAttention

from megaquant.megatron.cpu.attention import SDPAttention
from megaquant.nn.base import QuantModuleMixin
from megaquant.quantizer import TensorQuantizer

KV_ROLES = ("k", "v")
KV_PARAMS = ("key", "value")  # the parent forward's parameter names, one per role


class QuantCoreAttentionMixin(QuantModuleMixin):
    """Adds ``k_quantizer`` / ``v_quantizer`` to a core attention (see the module docstring)."""

    partition_axes = {"k": None, "v": None}  # heads are split over TP: amax MAX-reduced over TP

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers()

    def _setup_quantizers(self) -> None:
        type(self).kv_positions()  # refuse a core attention without key/value, at build time
        for role in KV_ROLES:
            setattr(self, f"{role}_quantizer", TensorQuantizer())

    @classmethod
    def kv_positions(cls) -> dict[str, int]:
        """Positions of ``key`` and ``value`` in the parent's ``forward``, found by name.

        Positions are never assumed (the same discipline as the TE operands): a release whose
        core attention renames them is refused here, naming the parameters it has, instead of
        quantizing the wrong tensors.
        """
        cached = cls.__dict__.get("_kv_positions")
        if cached is not None:
            return cached
        parent = next(c for c in cls.__mro__[1:]
                      if "forward" in c.__dict__ and not issubclass(c, QuantCoreAttentionMixin))
        params = list(inspect.signature(parent.__dict__["forward"]).parameters)[1:]  # no self
        missing = [n for n in KV_PARAMS if n not in params]
        if missing:
            raise TypeError(
                f"{cls.__name__}: {parent.__module__}.{parent.__qualname__}.forward has no "
                f"parameter(s) {missing} (it has {params}), so megaquant cannot find the keys "
                "and values to quantize; this Megatron release is not supported for KV-cache "
                "quantization (run `megaquant doctor`)")
        cls._kv_positions = {n: params.index(n) for n in KV_PARAMS}
        return cls._kv_positions

    def forward(self, *args, **kwargs):
        args = list(args)
        for role, name in zip(KV_ROLES, KV_PARAMS):
            quantizer, pos = getattr(self, f"{role}_quantizer"), self.kv_positions()[name]
            if name in kwargs:
                kwargs[name] = quantizer(kwargs[name])
            else:
                args[pos] = quantizer(args[pos])
        return super().forward(*args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._shard_quantizer_state(sharded, prefix, sharded_offsets, metadata)


class QuantDotProductAttention(QuantCoreAttentionMixin, DotProductAttention):
    """Megatron's local ``DotProductAttention`` with K/V quantizers (same constructor)."""


class QuantSDPAttention(QuantCoreAttentionMixin, SDPAttention):
    """megaquant's CPU ``SDPAttention`` with K/V quantizers (same constructor)."""


CORE_ATTENTION_WRAPPERS = {DotProductAttention: QuantDotProductAttention,
                           SDPAttention: QuantSDPAttention}
