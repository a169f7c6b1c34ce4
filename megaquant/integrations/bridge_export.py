"""Weights-only export through Megatron-Bridge's ``AutoBridge.export_hf_weights_quant`` (0.5+).

Bridge streams every Megatron weight to its HF name. For the names ``quantization_checker``
accepts it calls ``quant_fn(weight_shard, quant_block_size) -> (codes, scale)`` on each rank's
TP shard *before* gathering, then concatenates codes and scales along the shard axis (dim 0 for
column-parallel, dim 1 for row-parallel weights) and writes them as ``<name>`` and
``<name>_scale_inv`` (value = code x scale_inv, DeepSeek's FP8 convention). Read from Bridge's
``param_mapping.py``; the signature is in the contract fixture.

What fits that shape exactly: a format with one float decode scale per weight block and no
second-level scale, computed from the same amax megaquant calibrated:

* ``fp8`` (per tensor, or per output channel): ``scale_inv`` is ``[rows, 1]`` per shard (a per
  tensor scale repeated on every row, since Bridge concatenates 2-D scales);
* ``mxfp8``: ``scale_inv`` is ``[rows, cols / 32]``, the E8M0 block scales as float32.

Everything else (NVFP4's two-level scales, INT4/MXFP4's packed codes, INT8) is refused by
name, and no path writes activation scales or a ``quantization_config``: megaquant's own
exporter (``scripts/export.py``, :mod:`megaquant.export`) stays the full one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from megaquant.integrations.nemo import model_chunks

CARRIED = ("fp8", "mxfp8")
_EXPERT = re.compile(r"(\.local_experts\.)\d+(\.)")


@dataclass(frozen=True)
class QuantExportArgs:
    """The three arguments ``export_hf_weights_quant`` takes after the model."""

    quantization_checker: Callable[[str], bool]
    quant_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    quant_block_size: tuple[int, int]


def _key(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return _EXPERT.sub(r"\1*\2", name)  # experts are named globally by Bridge, locally here


def quant_export_args(model: Any) -> QuantExportArgs:
    """Checker, ``quant_fn`` and block size for ``model``'s quantized weights (see module doc)."""
    from megaquant.nn.base import QuantModuleMixin

    by_weight: dict[int, Any] = {}
    names: set[str] = set()
    kinds: set[str] = set()
    for chunk in model_chunks(model):
        for name, layer in chunk.named_modules():
            q = getattr(layer, "weight_quantizer", None)
            if not isinstance(layer, QuantModuleMixin) or q is None or q.mode == "off":
                continue
            if q.fmt.name not in CARRIED or getattr(q.fmt, "axis", None) not in (None, 0):
                raise ValueError(
                    f"{name}.weight_quantizer: {q.fmt} cannot be carried by Bridge's "
                    f"export_hf_weights_quant (it writes one float scale per weight block; "
                    f"carried: {', '.join(CARRIED)}); export with megaquant's exporter "
                    "(scripts/export.py) instead")
            by_weight[layer.weight.data_ptr()] = q
            names.add(_key(f"{name}.weight"))
            kinds.add(q.fmt.name)
    if not names:
        raise ValueError("the model has no quantized weight: quantize it first (attach / "
                         "quantize_and_save)")
    block = (1, 32) if kinds == {"mxfp8"} else (1, 1)
    if len(kinds) > 1:
        raise ValueError(f"export_hf_weights_quant takes one block size; the model mixes {kinds}")

    def quantization_checker(param_name: str) -> bool:
        return _key(param_name) in names

    def quant_fn(weight: torch.Tensor, quant_block_size=None):
        q = by_weight.get(weight.data_ptr())
        if q is None:
            raise KeyError(f"quant_fn got a weight of shape {tuple(weight.shape)} that is not a "
                           "quantized layer's own parameter (Bridge copied it?)")
        return encode(q, weight)

    return QuantExportArgs(quantization_checker, quant_fn, block)


def encode(quantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale_inv)`` of one weight shard with its quantizer's format and amax."""
    from megaquant.formats import constants as C
    from megaquant.formats.mx import e8m0_to_float

    fmt = quantizer.fmt
    if fmt.name == "mxfp8":
        qt = fmt.quantize(weight)
        e = qt.scale.to(torch.int32) - C.E8M0_BIAS
        return qt.codes, e8m0_to_float(e, qt.scale != C.E8M0_NAN)
    qt = fmt.quantize(weight, quantizer.amax if fmt.needs_amax else None)
    rows = weight.shape[0]
    scale = qt.scale.float().reshape(-1, 1)
    return qt.codes, scale.expand(rows, 1).contiguous() if scale.numel() == 1 else scale


def export_hf_weights_quant(bridge: Any, model: Any, **kwargs):
    """``bridge.export_hf_weights_quant(model, ...)`` with megaquant's formats; yields HF tuples.

    ``bridge``: an ``AutoBridge`` (Megatron-Bridge >= 0.5). Extra keywords (``cpu``,
    ``show_progress``) go to Bridge.
    """
    method = getattr(bridge, "export_hf_weights_quant", None)
    if method is None:
        from megaquant.integrations.contract import installed_version

        raise AttributeError(
            f"{type(bridge).__name__} has no export_hf_weights_quant (Megatron-Bridge >= 0.5; "
            f"installed: {installed_version('megatron-bridge') or 'none'}); use megaquant's "
            "exporter (scripts/export.py)")
    args = quant_export_args(model)
    return method(model, args.quantization_checker, args.quant_fn, args.quant_block_size,
                  **kwargs)
