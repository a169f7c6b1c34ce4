"""ModelOpt's unified Hugging Face checkpoint: ``hf_quant_config.json`` +
``quant_method: modelopt``.

Read by TensorRT-LLM, vLLM (``modelopt``/``modelopt_fp4``) and SGLang. Names, encodings and
``quant_algo`` strings follow what ModelOpt 0.47's own HF export writes for the same quantizers
(``modelopt/torch/export/quant_utils.py``: ``process_layer_quant_config``,
``to_quantized_weight``); value = how a reader decodes one HF linear ``m``:

==============  ====================  =============================================================
scheme          quant_algo            tensors
==============  ====================  =============================================================
nvfp4           NVFP4 (group 16)      ``weight`` uint8 [out, in/2] (E2M1, low nibble = even
                                      element), ``weight_scale`` float8_e4m3fn [out, in/16],
                                      ``weight_scale_2`` float32 [] (g = amax/(6*448)),
                                      ``input_scale`` float32 [];
                                      value = (code * weight_scale) * weight_scale_2
nvfp4_w4a16     W4A16_NVFP4 (16)      as nvfp4 without ``input_scale``
fp8             FP8                   ``weight`` float8_e4m3fn, ``weight_scale`` / ``input_scale``
                                      float32 []; value = code * weight_scale
int8            W8A8_SQ_PER_CHANNEL   ``weight`` int8, ``weight_scale`` float32 [out] (amax/127 per
                                      row), ``input_scale`` float32 [] (amax/127)
mxfp8           MXFP8 (group 32)      ``weight`` float8_e4m3fn, ``weight_scale`` uint8 [out, in/32]
                                      (E8M0: 2^(s - 127)); no input scale (per-block at run time)
mxfp4           mxfp4                 ``weight`` uint8 [out, in/2] (E2M1 nibbles as NVFP4),
                                      ``weight_scale`` uint8 [out, in/32] (E8M0)
int4_w4a16      W4A16_AWQ (group g)   ``weight`` uint8 [out/2, in]: rows 2j/2j+1 in the low/high
                                      nibble, two's complement; ``weight_scale`` float32
                                      [out, in/g]; ``pre_quant_scale`` float32 [in] of ones
==============  ====================  =============================================================

SmoothQuant (``int8_sq``) and AWQ (``int4_awq``) smoothing is folded into the weights, so the INT8
export has no ``pre_quant_scale`` (as ModelOpt's own INT8 max-calibration export), and the INT4 one
writes ones because ``W4A16_AWQ`` declares ``pre_quant_scale: true`` and its readers load the
tensor. ModelOpt writes ``quant_algo: "mxfp4"`` (lower case, no group size) for W4A4 MXFP4, which
no engine maps to a W4A4 kernel today (TensorRT-LLM has W4A16_MXFP4 and W4A8_MXFP4_*); the report
says so. Not written: per-channel FP8 with static activations (ModelOpt's per-channel FP8 is
dynamic per token).
"""

from __future__ import annotations

import torch
from torch import Tensor

import megaquant
from megaquant.export.packing import pack_int4_rows_uint8, pack_nibbles_uint8

U8, E4M3, F32, I8 = torch.uint8, torch.float8_e4m3fn, torch.float32, torch.int8
ALGO = {"nvfp4": "NVFP4", "nvfp4_w4a16": "W4A16_NVFP4", "fp8": "FP8",
        "int8": "W8A8_SQ_PER_CHANNEL", "mxfp8": "MXFP8", "mxfp4": "mxfp4",
        "int4_w4a16": "W4A16_AWQ"}
REFUSED = {"fp8_per_channel": "ModelOpt's per-channel FP8 (FP8_PER_CHANNEL_PER_TOKEN) quantizes "
                              "activations dynamically per token, not with one static scale"}
DTYPES = {
    "nvfp4": {"weight": U8, "weight_scale": E4M3, "weight_scale_2": F32, "input_scale": F32},
    "nvfp4_w4a16": {"weight": U8, "weight_scale": E4M3, "weight_scale_2": F32},
    "fp8": {"weight": E4M3, "weight_scale": F32, "input_scale": F32},
    "int8": {"weight": I8, "weight_scale": F32, "input_scale": F32},
    "mxfp8": {"weight": E4M3, "weight_scale": U8},
    "mxfp4": {"weight": U8, "weight_scale": U8},
    "int4_w4a16": {"weight": U8, "weight_scale": F32, "pre_quant_scale": F32},
}
NEEDS_DTYPE: dict[str, torch.dtype] = {}
# the rule ModelOpt and TensorRT-LLM use for run-time MX block scales: e = ceil(log2(amax/max))
MX_ACTIVATION_RULE = "round_up"


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def tensors(scheme: str, q) -> dict[str, Tensor]:
    """The tensors of one quantized linear ``q`` (a ``layouts.QuantLinear``), relative names."""
    w = q.weight
    if scheme in ("nvfp4", "nvfp4_w4a16"):
        out = {"weight": pack_nibbles_uint8(w.codes), "weight_scale": w.scale.contiguous(),
               "weight_scale_2": _f32(w.global_scale).reshape(())}
    elif scheme in ("fp8", "int8"):
        scale = _f32(w.scale)
        out = {"weight": w.codes.contiguous(),
               "weight_scale": scale.reshape(()) if scheme == "fp8" else scale.reshape(-1)}
    elif scheme == "mxfp8":
        out = {"weight": w.codes.contiguous(), "weight_scale": w.scale.contiguous()}
    elif scheme == "mxfp4":
        out = {"weight": pack_nibbles_uint8(w.codes), "weight_scale": w.scale.contiguous()}
    else:
        assert scheme == "int4_w4a16", scheme
        return {"weight": pack_int4_rows_uint8(w.codes), "weight_scale": _f32(w.scale),
                "pre_quant_scale": torch.ones(w.shape[-1], dtype=torch.float32)}
    if "input_scale" in DTYPES[scheme]:
        out["input_scale"] = _f32(q.input_scale).reshape(())
    return out


def _algo(scheme: str, block_size: int | None) -> dict:
    """``quant_algo`` and its group options for one scheme."""
    quant = {"quant_algo": ALGO[scheme]}
    if scheme in ("nvfp4", "nvfp4_w4a16"):
        quant["group_size"] = 16
    elif scheme == "mxfp8":
        quant["group_size"] = 32
    elif scheme == "int4_w4a16":
        quant.update(group_size=block_size, has_zero_point=False, pre_quant_scale=True)
    return quant


def _producer() -> dict:
    return {"name": "megaquant", "version": megaquant.__version__}


def hf_quant_config(scheme: str, ignore: list[str], *, block_size: int | None) -> dict:
    """``hf_quant_config.json`` (TensorRT-LLM reads it; vLLM detects ModelOpt by it)."""
    quant = {**_algo(scheme, block_size), "kv_cache_quant_algo": None,
             "exclude_modules": sorted(ignore)}
    return {"producer": _producer(), "quantization": quant}


def mixed_hf_quant_config(schemes: dict, ignore: list[str]) -> dict:
    """Mixed precision as ModelOpt writes it: ``quant_algo: MIXED_PRECISION`` and, per HF
    linear, its own ``quant_algo`` (+ ``group_size``) under ``quantized_layers`` (TensorRT-LLM's
    per-layer quant config; vLLM's ModelOptMixedPrecisionConfig)."""
    layers = {name: _algo(scheme, block) for scheme, (names, block) in schemes.items()
              for name in names}
    quant = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
             "quantized_layers": dict(sorted(layers.items())), "exclude_modules": sorted(ignore)}
    return {"producer": _producer(), "quantization": quant}


def no_linears_hf_quant_config(ignore: list[str]) -> dict:
    """No quantized linear (a KV-cache-only recipe): ``quant_algo: null``, what ModelOpt 0.47's
    ``get_quant_config`` writes when only the KV cache is quantized and what TensorRT-LLM reads as
    its KV-cache-only mode; :mod:`megaquant.export.kv` adds ``kv_cache_quant_algo``. Every linear
    is listed in ``exclude_modules`` (ModelOpt leaves it out): a reader that looks there keeps
    them unquantized."""
    quant = {"quant_algo": None, "kv_cache_quant_algo": None, "exclude_modules": sorted(ignore)}
    return {"producer": _producer(), "quantization": quant}


def no_linears_config(ignore: list[str]) -> dict:
    return {"quant_method": "modelopt", **no_linears_hf_quant_config(ignore)["quantization"]}


def quantization_config(scheme: str, ignore: list[str], *, block_size: int | None) -> dict:
    """``config.json``'s ``quantization_config``: the same keys plus ``quant_method``."""
    return {"quant_method": "modelopt",
            **hf_quant_config(scheme, ignore, block_size=block_size)["quantization"]}


def mixed_quantization_config(schemes: dict, ignore: list[str]) -> dict:
    return {"quant_method": "modelopt", **mixed_hf_quant_config(schemes, ignore)["quantization"]}


def notes(scheme: str) -> list[str]:
    if scheme == "mxfp4":
        return ["quant_algo 'mxfp4' is what ModelOpt 0.47 writes for W4A4 MXFP4; no engine maps it "
                "to a W4A4 kernel today (TensorRT-LLM has W4A16_MXFP4 and W4A8_MXFP4_*), and "
                "ModelOpt's convert_hf_quant_config_format has no config group for it"]
    return []
