"""The registry of quantized wrappers: exact parent type -> quantized subclass.

One dict, at the layer of what it registers (ModelOpt's ``QuantModuleRegistry`` sits under its
plugins; torchao's config -> handler table is a module of its own). :mod:`megaquant.convert`
reads it to swap classes in place. Lookup is by exact type, so that a user's subclass of
``ColumnParallelLinear`` is reported as skipped rather than silently given a forward that may
not match it; register it explicitly with :func:`register_quant_module` to convert it.

megaquant's own wrappers are registered by :func:`register_builtins`, explicitly, not as a side
effect of importing the layer modules.
"""

from __future__ import annotations

import importlib.util

from megaquant.nn.base import QuantModuleMixin

QUANT_MODULES: dict[type, type] = {}


def register_quant_module(src_cls: type, quant_cls: type) -> None:
    """Convert modules of exact type ``src_cls`` to ``quant_cls`` (a subclass with the mixin)."""
    if not (issubclass(quant_cls, src_cls) and issubclass(quant_cls, QuantModuleMixin)):
        raise TypeError(f"{quant_cls.__name__} must subclass {src_cls.__name__} and "
                        "QuantModuleMixin")
    QUANT_MODULES[src_cls] = quant_cls


def have_te() -> bool:
    """Whether Transformer Engine is installed (importing it is another matter: see below)."""
    return importlib.util.find_spec("transformer_engine") is not None


def register_builtins() -> None:
    """Register megaquant's wrappers: the local linears always, the TE ones when TE is installed.

    An installed TE that fails to import is an error (re-raised with context), never skipped.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megaquant.nn.attention import CORE_ATTENTION_WRAPPERS
    from megaquant.nn.local import QuantColumnParallelLinear, QuantRowParallelLinear

    register_quant_module(ColumnParallelLinear, QuantColumnParallelLinear)
    register_quant_module(RowParallelLinear, QuantRowParallelLinear)
    for src, quant in CORE_ATTENTION_WRAPPERS.items():  # converted only for kv_cache recipes
        register_quant_module(src, quant)
    if have_te():
        try:
            from megaquant.nn.te_layers import TE_WRAPPERS
        except Exception as e:  # a broken TE raises RuntimeError, not ImportError
            raise ImportError(
                "transformer_engine is installed but megaquant's TE wrappers failed to import; "
                "fix it, or uninstall transformer-engine (CPU machines must not have it)"
            ) from e
        for src, quant in TE_WRAPPERS.items():
            register_quant_module(src, quant)
