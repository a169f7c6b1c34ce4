"""vLLM's compressed-tensors layout:
``config.json: quantization_config.quant_method=compressed-tensors``.

Read by vLLM, SGLang, transformers and the ``compressed-tensors`` library (0.20 tested). One
config group targets every ``Linear`` except ``ignore``; per quantized HF linear ``m``:

================  ======================  ========================================================
scheme            format                  tensors
================  ======================  ========================================================
nvfp4(_w4a16)     nvfp4-pack-quantized    ``weight_packed`` uint8 [out, in/2] (E2M1, low nibble =
                                          even element), ``weight_scale`` float8_e4m3fn
                                          [out, in/16], ``weight_global_scale`` float32 [1] =
                                          **1/g**, ``input_global_scale`` float32 [1] = 1/g_act
                                          (W4A4 only);
                                          value = code * (weight_scale / weight_global_scale)
fp8(_per_channel) float-quantized         ``weight`` float8_e4m3fn, ``weight_scale`` float32 [1] or
                                          [out, 1], ``input_scale`` float32 [1]
int8              int-quantized           ``weight`` int8, ``weight_scale`` float32 [out, 1],
                                          ``input_scale`` float32 [1] (strategy channel / tensor)
mxfp8             mxfp8-quantized         ``weight`` float8_e4m3fn, ``weight_scale`` uint8
                                          [out, in/32] (E8M0: 2^(s - 127)); activations dynamic,
                                          group 32, ``scale_dtype: torch.uint8``
mxfp4             mxfp4-pack-quantized    ``weight_packed`` uint8 [out, in/2], ``weight_scale``
                                          uint8 [out, in/32] (E8M0)
int4_w4a16        pack-quantized          ``weight_packed`` int32 [out, in/8] (codes + 8, first
                                          element in the low bits), ``weight_scale`` float32
                                          [out, in/g], ``weight_shape`` int64 [2]
================  ======================  ========================================================

The library (and transformers through it) decompresses NVFP4 and MX weights to bfloat16, so
those schemes are written only with ``dtype=bfloat16`` (:data:`NEEDS_DTYPE`); FP8, INT8 and INT4
decompress to their float32 scales' dtype, and transformers casts them to the model dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

import megaquant
from megaquant.export.packing import pack_int4_int32, pack_nibbles_uint8

U8, E4M3, F32 = torch.uint8, torch.float8_e4m3fn, torch.float32
FORMAT = {"nvfp4": "nvfp4-pack-quantized", "nvfp4_w4a16": "nvfp4-pack-quantized",
          "fp8": "float-quantized", "fp8_per_channel": "float-quantized",
          "int8": "int-quantized", "mxfp8": "mxfp8-quantized", "mxfp4": "mxfp4-pack-quantized",
          "int4_w4a16": "pack-quantized"}
REFUSED: dict[str, str] = {}
# compressed-tensors decompresses these to bfloat16 whatever config.json says (its
# unpack_fp4_from_uint8 and E8M0 scales are bfloat16): transformers then multiplies bfloat16
# weights with float32/float16 activations and fails, so the layout needs a bfloat16 model
NEEDS_DTYPE = {s: torch.bfloat16 for s in ("nvfp4", "nvfp4_w4a16", "mxfp8", "mxfp4")}
DTYPES = {
    "nvfp4": {"weight_packed": U8, "weight_scale": E4M3, "weight_global_scale": F32,
              "input_global_scale": F32},
    "nvfp4_w4a16": {"weight_packed": U8, "weight_scale": E4M3, "weight_global_scale": F32},
    "fp8": {"weight": E4M3, "weight_scale": F32, "input_scale": F32},
    "fp8_per_channel": {"weight": E4M3, "weight_scale": F32, "input_scale": F32},
    "int8": {"weight": torch.int8, "weight_scale": F32, "input_scale": F32},
    "mxfp8": {"weight": E4M3, "weight_scale": U8},
    "mxfp4": {"weight_packed": U8, "weight_scale": U8},
    "int4_w4a16": {"weight_packed": torch.int32, "weight_scale": F32, "weight_shape": torch.int64},
}


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def tensors(scheme: str, q) -> dict[str, Tensor]:
    """The tensors of one quantized linear ``q`` (a ``layouts.QuantLinear``), relative names."""
    w = q.weight
    if scheme in ("nvfp4", "nvfp4_w4a16"):
        out = {"weight_packed": pack_nibbles_uint8(w.codes), "weight_scale": w.scale.contiguous(),
               "weight_global_scale": (1.0 / _f32(w.global_scale)).reshape(1)}
        if scheme == "nvfp4":
            out["input_global_scale"] = (1.0 / _f32(q.input_scale)).reshape(1)
        return out
    if scheme in ("fp8", "fp8_per_channel", "int8"):
        scale = _f32(w.scale)
        scale = scale.reshape(1) if scale.dim() == 0 else scale.reshape(-1, 1)
        return {"weight": w.codes.contiguous(), "weight_scale": scale,
                "input_scale": _f32(q.input_scale).reshape(1)}
    if scheme == "mxfp8":
        return {"weight": w.codes.contiguous(), "weight_scale": w.scale.contiguous()}
    if scheme == "mxfp4":
        return {"weight_packed": pack_nibbles_uint8(w.codes), "weight_scale": w.scale.contiguous()}
    assert scheme == "int4_w4a16", scheme
    return {"weight_packed": pack_int4_int32(w.codes), "weight_scale": _f32(w.scale),
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


_BASE = {"symmetric": True, "dynamic": False, "observer": "minmax", "actorder": None,
         "block_structure": None, "observer_kwargs": {}}


def _args(num_bits: int, kind: str, strategy: str, group_size=None, **extra) -> dict:
    return {**_BASE, "num_bits": num_bits, "type": kind, "strategy": strategy,
            "group_size": group_size, **extra}


def _group_args(scheme: str, block_size: int | None) -> tuple[dict, dict | None]:
    """(weights, input_activations) QuantizationArgs of the one config group."""
    if scheme in ("nvfp4", "nvfp4_w4a16"):
        # scale_dtype: block scales are E4M3 (as in compressed-tensors' NVFP4 preset); without it
        # compressed-tensors' own forward keeps dynamic activation block scales unrounded
        weights = _args(4, "float", "tensor_group", 16, scale_dtype="torch.float8_e4m3fn")
        return weights, ({**weights, "dynamic": "local"} if scheme == "nvfp4" else None)
    if scheme in ("fp8", "fp8_per_channel"):
        strategy = "channel" if scheme == "fp8_per_channel" else "tensor"
        return _args(8, "float", strategy), _args(8, "float", "tensor")
    if scheme == "int8":
        return _args(8, "int", "channel"), _args(8, "int", "tensor")
    if scheme in ("mxfp8", "mxfp4"):
        bits = 8 if scheme == "mxfp8" else 4
        weights = _args(bits, "float", "group", 32, scale_dtype="torch.uint8")
        return weights, {**weights, "dynamic": True, "observer": None}
    assert scheme == "int4_w4a16", scheme
    return _args(4, "int", "group", block_size), None


def _group(scheme: str, block_size: int | None, targets: list[str]) -> dict:
    weights, inputs = _group_args(scheme, block_size)
    return {"targets": targets, "weights": weights, "input_activations": inputs,
            "output_activations": None, "format": FORMAT[scheme]}


def _config(fmt: str, groups: dict, ignore: list[str]) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "config_groups": groups,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {},
            "version": f"megaquant-{megaquant.__version__}"}


def quantization_config(scheme: str, ignore: list[str], *, block_size: int | None) -> dict:
    """``config.json``'s ``quantization_config`` for the whole model (one scheme + ignored)."""
    return _config(FORMAT[scheme], {"group_0": _group(scheme, block_size, ["Linear"])}, ignore)


def no_linears_config(ignore: list[str]) -> dict:
    """No quantized linear (a KV-cache-only recipe): no config group, format ``dense`` (the
    weights are stored as they are), every linear in ``ignore`` (readers that match linears
    against targets keep them unquantized); :mod:`megaquant.export.kv` adds ``kv_cache_scheme``."""
    return _config("dense", {}, ignore)


def mixed_quantization_config(schemes: dict, ignore: list[str]) -> dict:
    """Mixed precision: one config group per scheme, targeting its HF modules by name (the
    library matches a target against module names as well as class names); the top-level
    ``format`` is ``mixed-precision``, each group carrying its own."""
    groups = {f"group_{i}": _group(scheme, block, names)
              for i, (scheme, (names, block)) in enumerate(schemes.items())}
    return _config("mixed-precision", groups, ignore)


def notes(scheme: str) -> list[str]:
    return []
