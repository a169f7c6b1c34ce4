"""The two on-disk layouts, behind one interface: which schemes each writes, and how.

* ``modelopt``: ModelOpt's unified HF checkpoint (``hf_quant_config.json``), read by
  TensorRT-LLM, vLLM and SGLang -- :mod:`megaquant.export.modelopt_layout`.
* ``compressed-tensors``: vLLM's format, read by vLLM, SGLang, transformers and the
  ``compressed-tensors`` library -- :mod:`megaquant.export.ct_layout`.

Each layout module holds a table per scheme: the tensors of one quantized HF linear and their
dtypes (checked before anything is renamed into place), the ``quantization_config``, and the
schemes it refuses with the reason. Which layout writes which scheme:

================  ==========================  ============================
scheme            modelopt                    compressed-tensors
================  ==========================  ============================
nvfp4             NVFP4                       nvfp4-pack-quantized
nvfp4_w4a16       W4A16_NVFP4                 nvfp4-pack-quantized
fp8               FP8                         float-quantized
fp8_per_channel   -- (dynamic per token)      float-quantized (channel)
int8              W8A8_SQ_PER_CHANNEL         int-quantized
mxfp8             MXFP8                       mxfp8-quantized
mxfp4             mxfp4 (see notes)           mxfp4-pack-quantized
int4_w4a16        W4A16_AWQ                   pack-quantized
================  ==========================  ============================

Activation scale rules (DECISIONS "Activation scale rules"): MX activations are scaled per
block by the engine at run time with its own E8M0 rule. Where that rule differs from the
recipe's ``scale_rule`` the export is written but the report marks its activations as
approximate (:func:`activation_notes`); likewise INT8, whose activation codes engines clamp at
-128 where megaquant clamps at -127. Weights are always exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megaquant.export import ct_layout, modelopt_layout
from megaquant.formats import QuantFormat, QuantizedTensor

LAYOUTS = ("modelopt", "compressed-tensors")
# The scheme of a model whose linears are all unquantized and whose KV cache is quantized (a
# KV-cache-only recipe such as ``kv_fp8``): every layout writes it, as a config that quantizes
# no linear (ModelOpt ``quant_algo: null``, compressed-tensors no config group, format dense).
NO_LINEARS = "none"
_MODULES = {"modelopt": modelopt_layout, "compressed-tensors": ct_layout}


@dataclass
class QuantLinear:
    """One HF linear ready to write: its quantized weight and its activation decode scale."""

    name: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    weight: QuantizedTensor
    # float32 scalar decode scale (FP8/INT8: amax/qmax, NVFP4: g), or None
    input_scale: Tensor | None
    block_size: int | None = None
    input_format: QuantFormat | None = None  # the input quantizer's format (None: unquantized)
    scheme: str = ""  # this linear's scheme (megaquant.export.schemes); mixed models differ


def by_scheme(quantized: list[QuantLinear]) -> dict[str, tuple[list[str], int | None]]:
    """scheme -> (HF module names, block size), sorted: what a config states per scheme."""
    out: dict[str, tuple[list[str], int | None]] = {}
    for q in quantized:
        out.setdefault(q.scheme, ([], q.block_size))[0].append(q.name)
    return {s: (sorted(names), block) for s, (names, block) in sorted(out.items())}


def _module(layout: str):
    if layout not in _MODULES:
        raise ValueError(f"unknown export layout {layout!r}; valid layouts: {list(LAYOUTS)}")
    return _MODULES[layout]


def supports(layout: str, scheme: str, dtype: torch.dtype | None = None) -> bool:
    """Whether ``layout`` writes ``scheme`` (with unquantized tensors in ``dtype``, if given)."""
    mod = _module(layout)
    if scheme == NO_LINEARS:
        return True
    need = mod.NEEDS_DTYPE.get(scheme)
    return scheme in mod.DTYPES and (dtype is None or need is None or dtype == need)


def why_not(layout: str, scheme: str, dtype: torch.dtype | None = None) -> str:
    """The reason ``layout`` does not write ``scheme`` (for reports and errors)."""
    mod = _module(layout)
    if scheme in mod.DTYPES:
        need = str(mod.NEEDS_DTYPE[scheme]).replace("torch.", "")
        return (f"{layout} writes {scheme} only with dtype={need}: its readers decompress these "
                f"weights to {need} whatever config.json says; export with dtype={need}")
    reason = mod.REFUSED.get(scheme, "no such scheme in this layout")
    return f"{layout} has no layout for scheme {scheme}: {reason}"


def module_tensors(layout: str, scheme: str, q: QuantLinear) -> dict[str, Tensor]:
    """The tensors of one quantized linear in ``layout`` (names relative to the module)."""
    return _module(layout).tensors(scheme, q)


def required_dtypes(layout: str, scheme: str) -> dict[str, torch.dtype]:
    """What each tensor of a module must be for the layout's claim to hold (checked on write)."""
    return _module(layout).DTYPES[scheme]


def _as_schemes(schemes, block_size) -> dict:
    return {schemes: ([], block_size)} if isinstance(schemes, str) else schemes


def quantization_config(layout: str, schemes: "dict | str", ignore: list[str], *,
                        block_size: int | None = None) -> dict:
    """``config.json``'s ``quantization_config`` for the whole model.

    ``schemes``: :func:`by_scheme`'s mapping (or one scheme name with its ``block_size``).
    One scheme: one config for every linear but
    ``ignore``; several (mixed precision): the layout's per-layer form (compressed-tensors: a
    config group per scheme targeting its modules; ModelOpt: ``MIXED_PRECISION`` with
    ``quantized_layers``).
    """
    mod, schemes = _module(layout), _as_schemes(schemes, block_size)
    if not schemes or NO_LINEARS in schemes:
        return mod.no_linears_config(ignore)
    if len(schemes) == 1:
        (scheme, (_, block)), = schemes.items()
        return mod.quantization_config(scheme, ignore, block_size=block)
    return mod.mixed_quantization_config(schemes, ignore)


def hf_quant_config(schemes: "dict | str", ignore: list[str], *,
                    block_size: int | None = None) -> dict:
    """ModelOpt's ``hf_quant_config.json`` (``schemes`` as for :func:`quantization_config`)."""
    schemes = _as_schemes(schemes, block_size)
    if not schemes or NO_LINEARS in schemes:
        return modelopt_layout.no_linears_hf_quant_config(ignore)
    if len(schemes) == 1:
        (scheme, (_, block)), = schemes.items()
        return modelopt_layout.hf_quant_config(scheme, ignore, block_size=block)
    return modelopt_layout.mixed_hf_quant_config(schemes, ignore)


_CT_MX_RULE = ("vLLM computes MX activation block scales at run time with its kernels' E8M0 "
               "rule (compressed-tensors' reference generate_mx_scales rounds the block amax to a "
               "power of two, then floor(log2) - emax_elem), which is neither 'ocp' nor "
               "'round_up' for every block")


_INT8_CLAMP = ("activations approximate: engines (vLLM, TensorRT-LLM, compressed-tensors) clamp "
               "static INT8 activation codes to [-128, 127], megaquant's symmetric INT8 to "
               "[-127, 127], so an activation below -127.5 x scale (beyond the calibrated amax) "
               "is one step lower in the engine (SmolLM2 int8_sq, 4 x 256 calibration tokens: "
               "perplexity 22.24 fake-quant, 22.08 with the engines' clamp, on 2 x 256 Hamlet "
               "tokens). Weights are exact.")


def activation_notes(layout: str, scheme: str, input_rules: set[str]) -> list[str]:
    """What a reader of ``layout`` computes differently from the fake-quant model (DECISIONS
    "Activation scale rules"), plus layout caveats; empty when the export is exact."""
    out = list(_module(layout).notes(scheme))
    if scheme == "int8":
        return out + [_INT8_CLAMP]
    if scheme not in ("mxfp8", "mxfp4"):
        return out
    rules = sorted(input_rules)
    if layout == "modelopt" and rules == [modelopt_layout.MX_ACTIVATION_RULE]:
        return out
    engine = (f"ModelOpt / TensorRT-LLM compute MX activation block scales with the "
              f"'{modelopt_layout.MX_ACTIVATION_RULE}' rule (e = ceil(log2(amax / elem_max)))"
              if layout == "modelopt" else _CT_MX_RULE)
    return out + [f"activations approximate: the recipe scales MX activations with scale_rule "
                  f"{rules}; {engine}. Weights are exact."]
