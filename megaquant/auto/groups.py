"""Layer groups: the layers that must take one format together.

Fused weights are already one layer in Megatron (``linear_qkv`` holds Q, K and V; a SwiGLU
``linear_fc1`` holds gate and up), which is also what the export layouts and the engines need
(vLLM loads q/k/v and gate/up into one fused GEMM with one scheme). What remains to tie is the
experts of one MoE layer: a grouped GEMM runs them all in one format, so every
``...experts.local_experts.<i>.linear_fc<k>`` of a layer joins the group ``...experts``
(fc1 and fc2 alike). Every rank finds the same group keys in the same order, whatever experts
it holds under expert parallelism.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from megaquant.nn.base import QuantModuleMixin

_EXPERT = re.compile(r"^(.*\.experts)\.local_experts\.\d+\.[^.]+$")


@dataclass
class LayerGroup:
    """One choice of the search: its recipe glob, its layers on this rank, its global size."""

    key: str            # e.g. "decoder.layers.3.mlp.linear_fc2" or "decoder.layers.1.mlp.experts"
    pattern: str        # the recipe rule's module glob
    layers: list = field(default_factory=list)   # (name, module) held by this rank
    shapes: list = field(default_factory=list)   # global (rows, cols) of every weight, all ranks


def _global_shape(layer: nn.Module) -> tuple[int, int]:
    # Megatron's parallel linears keep their unsharded sizes as input_size / output_size.
    return int(layer.output_size), int(layer.input_size)


def find_groups(model: nn.Module, converted: list[str]) -> list[LayerGroup]:
    """Groups of the converted (recipe-quantizable) layers, sorted by first appearance."""
    groups: dict[str, LayerGroup] = {}
    for name, module in model.named_modules():
        if name not in converted or not isinstance(module, QuantModuleMixin):
            continue
        m = _EXPERT.match(name)
        key = m.group(1) if m else name
        g = groups.setdefault(key, LayerGroup(key, f"{key}.*" if m else key))
        g.layers.append((name, module))
    for g in groups.values():
        for name, module in g.layers:
            if _EXPERT.match(name):
                # All experts have the same shape: scale this rank's share to the whole layer.
                local = sum(1 for n, _ in g.layers if n.endswith(name.rsplit(".", 1)[1]))
                total = int(module.config.num_moe_experts)
                g.shapes += [_global_shape(module)] * (total // local)
            else:
                g.shapes.append(_global_shape(module))
    return list(groups.values())
