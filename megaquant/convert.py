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

Rules match *global* module names. A pipeline stage numbers its transformer layers from 0
(``decoder.layers.0`` on every stage), while a recipe (a mixed-precision one above all) names
the layers of the whole model: each layer's global index is Megatron's ``layer_number - 1``
(:func:`global_names`), so ``decoder.layers.5.mlp.linear_fc2`` means the same layer at every
PP size. Without pipeline parallelism global and local names are the same.
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


_LAYER = re.compile(r"^((?:.*\.)?layers)\.(\d+)(?=\.|$)")


def global_names(model: nn.Module) -> dict[str, str]:
    """Module name -> its name in the whole model (the same without pipeline parallelism).

    A transformer layer knows its global 1-based ``layer_number`` (Megatron adds the stage's
    offset); every module under ``...layers.<i>`` takes ``...layers.<layer_number - 1>``.
    """
    offsets = {}
    for name, module in model.named_modules():
        m = _LAYER.match(name)
        number = getattr(module, "layer_number", None)
        if m and m.end() == len(name) and isinstance(number, int):
            offsets[name] = f"{m.group(1)}.{number - 1}"
    out = {}
    for name, _ in model.named_modules():
        m = _LAYER.match(name)
        head = m.group(0) if m else None
        out[name] = offsets[head] + name[len(head):] if head in offsets else name
    return out


def _layer_count(model: nn.Module) -> int | None:
    """The whole model's transformer layers (``config.num_layers``), or None if unknown."""
    config = getattr(getattr(model, "decoder", None), "config", None)
    return getattr(config, "num_layers", None)


def _every_layer(global_name: str, num_layers: int | None) -> list[str]:
    """``global_name`` in every transformer layer of the whole model (itself if none)."""
    m = _LAYER.match(global_name)
    if m is None or num_layers is None:
        return [global_name]
    return [f"{m.group(1)}.{i}{global_name[m.end():]}" for i in range(num_layers)]


def convert_model(model: nn.Module, recipe: Recipe) -> ConversionReport:
    """Swap every registered, non-excluded module for its quantized subclass, in place."""
    register_builtins()
    report = ConversionReport(recipe=recipe.name)
    names = global_names(model)
    for name, module in model.named_modules():
        _check_core_attention(name, module, recipe)
        if not _is_candidate(module, recipe):
            continue
        pattern = recipe.is_excluded(names[name])
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


def _check_rules_match(model: nn.Module, recipe: Recipe, report: ConversionReport,
                       names: dict) -> None:
    """Refuse a rule that matches no layer of the whole model (a typo would quantize nothing).

    A pipeline stage holds some transformer layers only: a rule naming another stage's layer
    matches here if it matches this stage's layers renumbered to any global layer (every
    stage's layers have the same module names, up to the index).
    """
    local = [names[n] for n in report.converted]
    count = _layer_count(model)
    whole = local
    if count is not None and len(getattr(model.decoder, "layers", ())) < count:  # a stage
        whole = sorted({g for n in local for g in _every_layer(n, count)})
    for rule_idx, rule in enumerate(recipe.rules):
        if not any(rule.matches(n) for n in whole):
            raise ValueError(
                f"recipe {recipe.name!r} rule {rule_idx} (modules {list(rule.modules)}) matches no "
                f"quantizable layer; layers are named like {local[:4]}"
            )


def apply_recipe(model: nn.Module, recipe: Recipe, report: ConversionReport) -> None:
    """Configure every quantizer of the converted layers from the recipe rules (matched on
    global names: :func:`global_names`)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)}
    names = global_names(model)
    _check_rules_match(model, recipe, report, names)
    for name, layer in layers.items():
        resolved = (recipe.resolve(names[name]) if name in report.converted
                    else {r: None for r in ROLES})
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


def _recipe_signature(recipe: Recipe, global_name: str) -> tuple:
    """What decides the shape of a layer's amax buffers, from the recipe alone: each role's
    format and mode (``unconverted`` where the recipe excludes the layer)."""
    if recipe.is_excluded(global_name):
        return ("unconverted",)
    return tuple(sorted((role, None if c is None else (c.mode, repr(c.build_format())))
                        for role, c in recipe.resolve(global_name).items()))


def mark_per_layer_state(model: nn.Module, recipe: Recipe) -> None:
    """Set ``per_layer_amax`` on every quantized layer whose stack differs over layers.

    Layers are stacked by their name with the transformer-layer and expert indices removed
    (``decoder.layers.3.mlp.linear_fc1`` -> ``decoder.layers.#.mlp.linear_fc1``); a stack whose
    members do not all carry the same quantizer formats and modes checkpoints its amax per
    layer (:meth:`megaquant.nn.base.QuantModuleMixin._shard_quantizer_state`). Uniform recipes
    keep the stacked keys, so their checkpoints are unchanged.

    The decision is read from the recipe for *every* layer of the whole model (each member's
    global name in every transformer layer), not from the modules this rank holds: a pipeline
    stage sees some layers only, and every stage must pick the same keys for one stack (a
    stacked tensor with another stage's layers missing could not be saved or loaded).
    """
    names, count = global_names(model), _layer_count(model)
    stacks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if _is_candidate(module, recipe) and _LAYER_INDEX.search(name):
            stacks.setdefault(_LAYER_INDEX.sub(r"\1\2.#.", name), []).append((name, module))
    for members in stacks.values():
        every = {g for name, _ in members for g in _every_layer(names[name], count)}
        mixed = len({_recipe_signature(recipe, g) for g in every}) > 1
        for _, m in members:
            if isinstance(m, QuantModuleMixin):
                m.per_layer_amax = mixed
