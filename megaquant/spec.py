"""The Megatron spec provider: where quantized layers enter a model that is being built.

Megatron-Core builds layers from a ``BackendSpecProvider`` (``column_parallel_linear()``,
``row_parallel_linear()``, ``layer_norm()``, ...). megaquant's providers are subclasses of
Megatron's that answer the linear questions with quantized subclasses and leave everything else
to the parent, so a new Megatron method is inherited rather than broken.

Backends: ``local`` (Megatron's own linears) always; ``te`` (Transformer Engine linears,
:mod:`megaquant.nn.te_spec`) when TE is installed; ``auto`` picks ``te`` when it can and falls
back to ``local``. Layers built this way have all quantizers off until
:func:`megaquant.quantize` applies a recipe.
"""

from __future__ import annotations

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider

from megaquant.nn.local import QuantColumnParallelLinear, QuantRowParallelLinear
from megaquant.nn.registry import have_te

BACKENDS = ("auto", "local", "te")


class QuantLocalSpecProvider(LocalSpecProvider):
    """Megatron's local provider with quantized column/row parallel linears."""

    def column_parallel_linear(self) -> type:
        return QuantColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return QuantRowParallelLinear


def get_spec_provider(backend: str = "auto") -> BackendSpecProvider:
    """A quantized spec provider for ``backend`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS}")
    if backend == "te" or (backend == "auto" and have_te()):
        if not have_te():
            raise ValueError("backend 'te' needs transformer-engine (pip install megaquant[te])")
        from megaquant.nn.te_spec import QuantTESpecProvider

        return QuantTESpecProvider()
    return QuantLocalSpecProvider()


def quantized_gpt_layer_spec(backend: str = "auto"):
    """A GPT transformer-layer spec whose linears are quantized (quantizers off until a recipe)."""
    from megaquant.models.gpt import gpt_layer_spec

    return gpt_layer_spec(get_spec_provider(backend))
