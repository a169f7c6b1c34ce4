"""``CPUSpecProvider``: the CPU runtime behind Megatron's own extension point.

Megatron-Core builds layers from a ``BackendSpecProvider`` (``LocalSpecProvider``,
``TESpecProvider``). On a machine without CUDA two of its answers cannot run: the core
attention (``DotProductAttention`` allocates on the CUDA device) and the torch fallback norm
(``WrappedTorchNorm`` refuses sequence parallelism). ``CPUSpecProvider`` wraps any provider
(the local one, megaquant's quantized one, a user's) and answers those two questions with
:class:`~megaquant.megatron.cpu.attention.SDPAttention` and
:class:`~megaquant.megatron.cpu.norm.TorchNorm`; the linears and everything else come from the
wrapped provider, so quantized layers stay quantized. It also answers ``moe_layer()`` and
``moe_router()`` (not Megatron provider methods: the GPT spec asks any provider that has them)
with the CPU MoE pieces.

:func:`for_this_machine` is the one place that asks ``torch.cuda.is_available()`` to choose.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megaquant.megatron.cpu.attention import SDPAttention
from megaquant.megatron.cpu.moe import CPUMoELayer, CPUTopKRouter
from megaquant.megatron.cpu.norm import TorchNorm


class CPUSpecProvider(BackendSpecProvider):
    """A provider for CPU/gloo runs: ``inner``'s layers with CPU attention, norm and MoE."""

    def __init__(self, inner: BackendSpecProvider):
        if isinstance(inner, CPUSpecProvider):
            inner = inner.inner
        self.inner = inner

    # --- what the CPU runtime answers itself
    def core_attention(self) -> type:
        return SDPAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        norm = self.inner.layer_norm(rms_norm=rms_norm, for_qk=for_qk)
        return TorchNorm if norm is WrappedTorchNorm else norm

    def moe_layer(self) -> type:
        return CPUMoELayer

    def moe_router(self) -> type:
        return CPUTopKRouter

    # --- everything else is the wrapped provider's
    def column_parallel_linear(self) -> type:
        return self.inner.column_parallel_linear()

    def row_parallel_linear(self) -> type:
        return self.inner.row_parallel_linear()

    def fuse_layernorm_and_linear(self) -> bool:
        return self.inner.fuse_layernorm_and_linear()

    def column_parallel_layer_norm_linear(self) -> Optional[type]:
        return self.inner.column_parallel_layer_norm_linear()

    def grouped_mlp_modules(self, *args, **kwargs):
        return self.inner.grouped_mlp_modules(*args, **kwargs)

    def activation_func(self) -> type:
        return self.inner.activation_func()


def for_this_machine(backend: BackendSpecProvider) -> BackendSpecProvider:
    """``backend`` on a machine with CUDA; ``CPUSpecProvider(backend)`` without."""
    if torch.cuda.is_available():
        return backend
    return backend if isinstance(backend, CPUSpecProvider) else CPUSpecProvider(backend)
