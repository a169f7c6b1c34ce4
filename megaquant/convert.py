"""In-place conversion of a built model.

Conversion swaps the class of each module registered in :mod:`megaquant.nn.registry` (exact
parent type -> quantized subclass: ``module.__class__ = QuantCls``) and creates its quantizers;
parameters, buffers, devices and hooks are the module's own and stay where they are. A user's
subclass of ``ColumnParallelLinear`` is reported as skipped; register it with
:func:`register_quant_module` to convert it.

Core attentions (:mod:`megaquant.nn.attention`) are converted only when the recipe has a
``kv_cache:`` section; then every module named ``*.core_attention`` must be of a registered type,
or conversion refuses it by name (a custom core attention would leave the cache unquantized).

After conversion :func:`apply_recipe` sets every quantizer's format and mode from the recipe
rules. Both steps report what they did in a :class:`ConversionReport`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from megaquant.nn.attention import QuantCoreAttentionMixin
from megaquant.nn.base import QuantModuleMixin
from megaquant.nn.registry import (  # noqa: F401  (have_te, register_quant_module: public here)
    QUANT_MODULES,
    have_te,
    register_builtins,
    register_quant_module,
)
from megaquant.quantizer import TensorQuantizer
from megaquant.recipe import ROLES, Recipe


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


def _is_candidate(module: nn.Module, recipe: Recipe) -> bool:
    quant = module if isinstance(module, QuantModuleMixin) else QUANT_MODULES.get(type(module))
    if quant is None:
        return False
    is_attention = isinstance(quant, QuantCoreAttentionMixin) or (
        isinstance(quant, type) and issubclass(quant, QuantCoreAttentionMixin))
    return recipe.kv_cache is not None or not is_attention


def _check_core_attention(name: str, module: nn.Module, recipe: Recipe) -> None:
    """Refuse a core attention with no known place for the K/V quantizers (kv_cache recipes)."""
    if recipe.kv_cache is None or name.rsplit(".", 1)[-1] != "core_attention":
        return
    if isinstance(module, QuantCoreAttentionMixin) or type(module) in QUANT_MODULES:
        return
    known = sorted(c.__name__ for c, q in QUANT_MODULES.items()
                   if issubclass(q, QuantCoreAttentionMixin))
    raise ValueError(
        f"recipe {recipe.name!r} quantizes the KV cache, but {name} is a "
        f"{type(module).__module__}.{type(module).__name__}, a core attention with no known "
        f"place for the K/V quantizers (known: {known}); use one of those in the layer spec, "
        "register a quantized subclass with megaquant.convert.register_quant_module, or drop "
        "the recipe's kv_cache section")


def convert_model(model: nn.Module, recipe: Recipe) -> ConversionReport:
    """Swap every registered, non-excluded module for its quantized subclass, in place."""
    register_builtins()
    report = ConversionReport(recipe=recipe.name)
    for name, module in model.named_modules():
        _check_core_attention(name, module, recipe)
        if not _is_candidate(module, recipe):
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
            quantizer.fixed_amax = False
            if cfg is None:
                quantizer.configure(None, "off")
            else:
                quantizer.configure(cfg.build_format(), cfg.mode)
                report.enabled_quantizers.setdefault(name, []).append(qname)
                fixed = recipe.kv_cache.fixed_amax if role in ("k", "v") else None
                if fixed is not None:  # kv_cache scale: unit; calibration leaves it alone
                    quantizer.load_amax(torch.tensor(fixed))
                    quantizer.fixed_amax = True
    mark_per_layer_state(model, recipe)


_LAYER_INDEX = re.compile(r"(^|\.)(layers|local_experts)\.\d+\.")


def _state_signature(module: nn.Module) -> tuple:
    """What decides the shape of a layer's amax buffers: each quantizer's format and mode."""
    if not isinstance(module, QuantModuleMixin):
        return ("unconverted",)
    return tuple((qname, q.mode, repr(q.fmt) if q.is_enabled else None)
                 for qname, _, q in module.quantizers())


def mark_per_layer_state(model: nn.Module, recipe: Recipe) -> None:
    """Set ``per_layer_amax`` on every quantized layer whose stack differs over layers.

    Layers are stacked by their name with the transformer-layer and expert indices removed
    (``decoder.layers.3.mlp.linear_fc1`` -> ``decoder.layers.#.mlp.linear_fc1``); a stack whose
    members do not all carry the same quantizer formats and modes checkpoints its amax per
    layer (:meth:`megaquant.nn.base.QuantModuleMixin._shard_quantizer_state`). Uniform recipes
    keep the stacked keys, so their checkpoints are unchanged. Every rank walks the same module
    names and recipe, so every rank decides the same (no pipeline split of layers here).
    """
    stacks: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        if _is_candidate(module, recipe) and _LAYER_INDEX.search(name):
            stacks.setdefault(_LAYER_INDEX.sub(r"\1\2.#.", name), []).append(module)
    for members in stacks.values():
        mixed = len({_state_signature(m) for m in members}) > 1
        for m in members:
            if isinstance(m, QuantModuleMixin):
                m.per_layer_amax = mixed
