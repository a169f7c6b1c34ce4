"""In-place conversion of a built model, and the registry of quantized wrappers.

The registry is one dict: exact parent type -> quantized subclass. Conversion swaps the class of
each registered module (``module.__class__ = QuantCls``) and creates its quantizers; parameters,
buffers, devices and hooks are the module's own and stay where they are. Lookup is by exact type
so that a user's subclass of ``ColumnParallelLinear`` is reported as skipped rather than silently
given a forward that may not match it; register it explicitly to convert it.

After conversion :func:`apply_recipe` sets every quantizer's format and mode from the recipe
rules. Both steps report what they did in a :class:`ConversionReport`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from torch import nn

from megaquant.nn.base import QuantModuleMixin
from megaquant.quantizer import TensorQuantizer
from megaquant.recipe import ROLES, Recipe

QUANT_MODULES: dict[type, type] = {}


def register_quant_module(src_cls: type, quant_cls: type) -> None:
    """Convert modules of exact type ``src_cls`` to ``quant_cls`` (a subclass with the mixin)."""
    if not (issubclass(quant_cls, src_cls) and issubclass(quant_cls, QuantModuleMixin)):
        raise TypeError(f"{quant_cls.__name__} must subclass {src_cls.__name__} and QuantModuleMixin")
    QUANT_MODULES[src_cls] = quant_cls


def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def register_builtins() -> None:
    """Register megaquant's wrappers: the local linears always, the TE ones when TE is installed.

    An installed TE that fails to import is an error (re-raised with context), never skipped.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megaquant.nn.local import QuantColumnParallelLinear, QuantRowParallelLinear

    register_quant_module(ColumnParallelLinear, QuantColumnParallelLinear)
    register_quant_module(RowParallelLinear, QuantRowParallelLinear)
    if have_te():
        try:
            import megaquant.nn.te_layers  # noqa: F401  (registers the TE wrappers at import)
        except Exception as e:  # a broken TE raises RuntimeError, not ImportError
            raise ImportError(
                "transformer_engine is installed but megaquant's TE wrappers failed to import; "
                "fix it, or uninstall transformer-engine (CPU machines must not have it)"
            ) from e


@dataclass
class ConversionReport:
    """What conversion did: converted/already-quantized layers, and skipped ones with a reason."""

    recipe: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    enabled_quantizers: dict[str, list[str]] = field(default_factory=dict)  # layer -> roles on
    calibration: dict = field(default_factory=dict)

    def summary(self) -> str:
        n_q = sum(len(r) for r in self.enabled_quantizers.values())
        return (
            f"recipe {self.recipe}: {len(self.enabled_quantizers)} layers quantized "
            f"({n_q} quantizers on), {len(self.skipped)} skipped"
        )


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, QuantModuleMixin) or type(module) in QUANT_MODULES


def convert_model(model: nn.Module, recipe: Recipe) -> ConversionReport:
    """Swap every registered, non-excluded module for its quantized subclass, in place."""
    register_builtins()
    report = ConversionReport(recipe=recipe.name)
    for name, module in model.named_modules():
        if not _is_candidate(module):
            continue
        pattern = recipe.is_excluded(name)
        if pattern is not None:
            report.skipped[name] = f"excluded by {pattern!r}"
            continue
        if not isinstance(module, QuantModuleMixin):
            module.__class__ = QUANT_MODULES[type(module)]
            module._setup_quantizers()
        report.converted.append(name)
    if not report.converted:
        known = sorted(c.__name__ for c in QUANT_MODULES)
        raise ValueError(
            f"nothing to quantize: the model has no layer of a registered type ({known}) that "
            f"recipe {recipe.name!r} does not exclude; skipped: {report.skipped or 'none'}. "
            "Register your layer types with megaquant.convert.register_quant_module."
        )
    return report


def apply_recipe(model: nn.Module, recipe: Recipe, report: ConversionReport) -> None:
    """Configure every quantizer of the converted layers from the recipe rules."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)}
    for rule_idx, rule in enumerate(recipe.rules):
        if not any(rule.matches(n) for n in report.converted):
            raise ValueError(
                f"recipe {recipe.name!r} rule {rule_idx} (modules {list(rule.modules)}) matches no "
                f"quantizable layer; layers are named like {report.converted[:4]}"
            )
    for name, layer in layers.items():
        resolved = recipe.resolve(name) if name in report.converted else {r: None for r in ROLES}
        for qname, quantizer in layer.named_modules():
            if not isinstance(quantizer, TensorQuantizer) or not qname:
                continue
            role = qname.split(".")[0].rsplit("_quantizer", 1)[0]
            cfg = resolved.get(role)
            quantizer.name = f"{name}.{qname}"
            if cfg is None:
                quantizer.configure(None, "off")
            else:
                quantizer.configure(cfg.build_format(), cfg.mode)
                report.enabled_quantizers.setdefault(name, []).append(qname)
