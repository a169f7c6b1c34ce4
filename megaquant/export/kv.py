"""KV-cache scales in the exported checkpoints: per layer, K and V, in each layout's names.

A model quantized with a recipe's ``kv_cache:`` section has, in every layer's core attention, a
``k_quantizer`` and a ``v_quantizer`` with one static amax (MAX over TP and DP: one number per
layer, whatever the parallel layout). The engines read one float32 decode scale per layer and
tensor, ``cache value = stored code * scale``:

=====================  ====================================  =================================
layout                 config                                tensors (per decoder layer ``i``)
=====================  ====================================  =================================
modelopt, fp8 KV       ``kv_cache_quant_algo: "FP8"``        ``model.layers.i.self_attn.k_proj.
                                                             k_scale`` and ``...v_proj.v_scale``
                                                             float32 [] = amax / 448
modelopt, nvfp4 KV     ``kv_cache_quant_algo: "NVFP4"``      the same names, = amax / (6 * 448):
                                                             the NVFP4 global scale (TensorRT-LLM)
compressed-tensors     ``kv_cache_scheme``: 8-bit float,     ``model.layers.i.self_attn.k_scale``
fp8 KV                 strategy tensor, static               / ``v_scale`` float32 [1] = amax/448
compressed-tensors     refused: compressed-tensors and vLLM define no FP4 KV-cache scheme
nvfp4 KV               (vLLM's loader accepts 8-bit float ``kv_cache_scheme`` only)
=====================  ====================================  =================================

vLLM maps both spellings (``self_attn.k_proj.k_scale`` and ``self_attn.k_scale``) onto its
attention layer's ``k_scale`` (``maybe_remap_kv_scale_name``). ModelOpt's own exporter raises an
FP8 KV scale below 1.0 to 1.0; megaquant writes the scale the model was calibrated and evaluated
with (``kv_cache: {scale: unit}`` gives exactly 1.0, as ModelOpt's ``fp8_cast``).

A model whose only quantizers are these (a KV-cache-only recipe such as ``kv_fp8``) is exported
too: its linears stay in the export dtype and each layout's config quantizes none of them
(:data:`megaquant.export.layouts.NO_LINEARS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

E4M3_MAX, E2M1_MAX = 448.0, 6.0
MODELOPT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
CT_FORMATS = ("fp8",)


@dataclass
class KVScales:
    """The KV format and per-layer amax of a model: ``amax[i] = (k_amax, v_amax)``."""

    format: str
    amax: dict  # decoder layer index -> (k amax, v amax), float32 scalars

    def decode_scale(self, amax: Tensor) -> Tensor:
        denom = E4M3_MAX if self.format == "fp8" else E2M1_MAX * E4M3_MAX
        return (amax.detach().float() / denom).reshape(())


def collect_kv(model: torch.nn.Module) -> KVScales | None:
    """The KV-cache quantizers of ``model`` (None when it has none on)."""
    from megaquant.nn.attention import QuantCoreAttentionMixin

    found, formats = {}, set()
    for name, m in model.named_modules():
        if not isinstance(m, QuantCoreAttentionMixin) or not m.k_quantizer.is_enabled:
            continue
        parts = name.split(".")
        if "layers" not in parts:
            raise ValueError(f"{name}: a KV-quantized core attention outside decoder.layers.N")
        index = int(parts[parts.index("layers") + 1])
        for q in (m.k_quantizer, m.v_quantizer):
            if not q.has_amax or not bool(torch.isfinite(q.amax).all()) or float(q.amax) <= 0:
                raise ValueError(f"{q.name}: KV amax {q.amax.tolist()} is not a positive finite "
                                 "number: calibrate the model before exporting")
            formats.add(q.fmt.name)
        found[index] = (m.k_quantizer.amax, m.v_quantizer.amax)
    if not found:
        return None
    assert len(formats) == 1, f"one KV format per model, got {sorted(formats)}"
    return KVScales(formats.pop(), found)


def why_not(layout: str, kv: KVScales | None) -> str | None:
    """Why ``layout`` cannot hold the KV scales (None: it can)."""
    if kv is None or layout == "modelopt" or kv.format in CT_FORMATS:
        return None
    return (f"{layout} has no {kv.format} KV cache: compressed-tensors and vLLM define 8-bit "
            "float kv_cache_scheme only; export the modelopt layout (TensorRT-LLM reads NVFP4 KV)")


def tensors(layout: str, kv: KVScales) -> dict[str, Tensor]:
    """Per-layer K/V decode scales under ``layout``'s names."""
    out = {}
    for i, (k, v) in sorted(kv.amax.items()):
        base = f"model.layers.{i}.self_attn"
        if layout == "modelopt":
            out[f"{base}.k_proj.k_scale"] = kv.decode_scale(k)
            out[f"{base}.v_proj.v_scale"] = kv.decode_scale(v)
        else:
            out[f"{base}.k_scale"] = kv.decode_scale(k).reshape(1)
            out[f"{base}.v_scale"] = kv.decode_scale(v).reshape(1)
    return out


def config_fields(layout: str, kv: KVScales | None) -> dict:
    """What the layout's quantization config says about the KV cache."""
    if layout == "modelopt":
        return {"kv_cache_quant_algo": None if kv is None else MODELOPT_ALGO[kv.format]}
    if kv is None:
        return {"kv_cache_scheme": None}
    return {"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                "dynamic": False, "symmetric": True, "group_size": None,
                                "block_structure": None, "actorder": None,
                                "observer": "minmax", "observer_kwargs": {}}}
