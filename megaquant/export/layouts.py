"""The two on-disk layouts: ModelOpt's unified HF checkpoint and vLLM's compressed-tensors.

Each layout turns one quantized Hugging Face linear (its :class:`QuantizedTensor` weight and the
activation scale) into the tensors a serving engine reads, and describes the whole model in its
``quantization_config``. Names and encodings (value = how a reader decodes them):

**modelopt** (``hf_quant_config.json`` + ``config.json: quantization_config.quant_method=modelopt``;
read by TensorRT-LLM, vLLM ``modelopt``/``modelopt_fp4``, SGLang):

* NVFP4 (``quant_algo: NVFP4``, ``group_size: 16``): ``weight`` uint8 [out, in/2] (E2M1 codes, low
  nibble = even element), ``weight_scale`` float8_e4m3fn [out, in/16], ``weight_scale_2`` float32
  [] (the global *decode* scale g = amax / (6*448)), ``input_scale`` float32 [] (the activation's
  g). value = (code * weight_scale) * weight_scale_2.
* FP8 (``quant_algo: FP8``): ``weight`` float8_e4m3fn, ``weight_scale`` float32 [],
  ``input_scale`` float32 []; value = code * weight_scale.

**compressed-tensors** (``config.json: quantization_config.quant_method=compressed-tensors``;
read by vLLM, SGLang and the ``compressed-tensors`` library):

* NVFP4 (format ``nvfp4-pack-quantized``): ``weight_packed`` uint8 [out, in/2] (same nibbles),
  ``weight_scale`` float8_e4m3fn [out, in/16], ``weight_global_scale`` float32 [1] = **1 / g**
  (compressed-tensors stores the reciprocal and decodes code * (scale / global_scale)),
  ``input_global_scale`` float32 [1] = 1 / g of the activation (W4A4 only).
* FP8 (``float-quantized``): ``weight`` float8_e4m3fn, ``weight_scale`` float32 [1] (per tensor) or
  [out, 1] (per channel), ``input_scale`` float32 [1].
* INT4 (``pack-quantized``): ``weight_packed`` int32 [out, in/8] (codes + 8, first element in the
  low bits), ``weight_scale`` float32 [out, in/128], ``weight_shape`` int64 [2].

Which layout writes which scheme: ModelOpt has no static-activation per-channel FP8
(its ``FP8_PER_CHANNEL_PER_TOKEN`` is dynamic per token), no weight-only NVFP4, and its INT4
(``W4A16_AWQ``) packs along the *output* dimension with AWQ pre-quant scales, which we do not
produce; those schemes are written in compressed-tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import megaquant
from megaquant.export.packing import pack_int4_int32, pack_nibbles_uint8
from megaquant.formats import QuantizedTensor

LAYOUTS = ("modelopt", "compressed-tensors")
_MODELOPT_ALGO = {"nvfp4": "NVFP4", "fp8": "FP8"}
_CT_FORMAT = {"nvfp4": "nvfp4-pack-quantized", "nvfp4_w4a16": "nvfp4-pack-quantized",
              "fp8": "float-quantized", "fp8_per_channel": "float-quantized",
              "int4_w4a16": "pack-quantized"}


@dataclass
class QuantLinear:
    """One HF linear ready to write: its quantized weight and its activation decode scale."""

    name: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    weight: QuantizedTensor
    input_scale: Tensor | None  # float32 scalar decode scale (FP8: amax/448, NVFP4: g), or None
    block_size: int | None = None


def supports(layout: str, scheme: str) -> bool:
    if layout == "modelopt":
        return scheme in _MODELOPT_ALGO
    if layout == "compressed-tensors":
        return scheme in _CT_FORMAT
    raise ValueError(f"unknown export layout {layout!r}; valid layouts: {list(LAYOUTS)}")


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def module_tensors(layout: str, scheme: str, q: QuantLinear) -> dict[str, Tensor]:
    """The tensors of one quantized linear in ``layout`` (names relative to the module)."""
    w = q.weight
    if layout == "modelopt":
        if scheme == "nvfp4":
            return {"weight": pack_nibbles_uint8(w.codes), "weight_scale": w.scale.contiguous(),
                    "weight_scale_2": _f32(w.global_scale).reshape(()),
                    "input_scale": _f32(q.input_scale).reshape(())}
        return {"weight": w.codes.contiguous(), "weight_scale": _f32(w.scale).reshape(()),
                "input_scale": _f32(q.input_scale).reshape(())}
    if scheme in ("nvfp4", "nvfp4_w4a16"):
        out = {"weight_packed": pack_nibbles_uint8(w.codes), "weight_scale": w.scale.contiguous(),
               "weight_global_scale": (1.0 / _f32(w.global_scale)).reshape(1)}
        if scheme == "nvfp4":
            out["input_global_scale"] = (1.0 / _f32(q.input_scale)).reshape(1)
        return out
    if scheme in ("fp8", "fp8_per_channel"):
        scale = _f32(w.scale)
        scale = scale.reshape(1) if scale.dim() == 0 else scale.reshape(-1, 1)
        return {"weight": w.codes.contiguous(), "weight_scale": scale,
                "input_scale": _f32(q.input_scale).reshape(1)}
    assert scheme == "int4_w4a16", scheme
    return {"weight_packed": pack_int4_int32(w.codes), "weight_scale": _f32(w.scale),
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def required_dtypes(layout: str, scheme: str) -> dict[str, torch.dtype]:
    """What each tensor of a module must be for the layout's claim to hold (checked on write)."""
    if layout == "modelopt":
        return ({"weight": torch.uint8, "weight_scale": torch.float8_e4m3fn,
                 "weight_scale_2": torch.float32, "input_scale": torch.float32}
                if scheme == "nvfp4" else
                {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32,
                 "input_scale": torch.float32})
    if scheme.startswith("nvfp4"):
        d = {"weight_packed": torch.uint8, "weight_scale": torch.float8_e4m3fn,
             "weight_global_scale": torch.float32}
        return {**d, "input_global_scale": torch.float32} if scheme == "nvfp4" else d
    if scheme.startswith("fp8"):
        return {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32,
                "input_scale": torch.float32}
    return {"weight_packed": torch.int32, "weight_scale": torch.float32, "weight_shape": torch.int64}


def _ct_args(scheme: str, role: str) -> dict | None:
    base = {"symmetric": True, "dynamic": False, "observer": "minmax", "actorder": None,
            "block_structure": None, "observer_kwargs": {}}
    if scheme in ("nvfp4", "nvfp4_w4a16"):
        if role == "input" and scheme == "nvfp4_w4a16":
            return None
        # scale_dtype: block scales are E4M3 (as in compressed-tensors' NVFP4 preset); without it
        # compressed-tensors' own forward keeps dynamic activation block scales unrounded
        args = {**base, "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                "scale_dtype": "torch.float8_e4m3fn"}
        return {**args, "dynamic": "local"} if role == "input" else args
    if scheme in ("fp8", "fp8_per_channel"):
        strategy = "channel" if (scheme == "fp8_per_channel" and role == "weight") else "tensor"
        return {**base, "num_bits": 8, "type": "float", "strategy": strategy, "group_size": None}
    if role == "input":
        return None
    return {**base, "num_bits": 4, "type": "int", "strategy": "group", "group_size": None}


def quantization_config(layout: str, scheme: str, ignore: list[str], *,
                        block_size: int | None) -> dict:
    """``config.json``'s ``quantization_config`` for the whole model (one scheme + ignored)."""
    if layout == "modelopt":
        return {"quant_method": "modelopt", **hf_quant_config(scheme, ignore)["quantization"]}
    weights = _ct_args(scheme, "weight")
    if scheme == "int4_w4a16":
        weights["group_size"] = block_size
    group = {"targets": ["Linear"], "weights": weights, "input_activations": _ct_args(scheme, "input"),
             "output_activations": None, "format": _CT_FORMAT[scheme]}
    return {"quant_method": "compressed-tensors", "format": _CT_FORMAT[scheme],
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {},
            "version": f"megaquant-{megaquant.__version__}"}


def hf_quant_config(scheme: str, ignore: list[str]) -> dict:
    """ModelOpt's ``hf_quant_config.json`` (TensorRT-LLM reads it; vLLM detects ModelOpt by it)."""
    quant = {"quant_algo": _MODELOPT_ALGO[scheme], "kv_cache_quant_algo": None,
             "exclude_modules": sorted(ignore)}
    if scheme == "nvfp4":
        quant["group_size"] = 16
    return {"producer": {"name": "megaquant", "version": megaquant.__version__},
            "quantization": quant}
