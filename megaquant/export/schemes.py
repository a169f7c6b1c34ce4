"""What a quantized layer's quantizers amount to, as one of the schemes the exporter writes.

A scheme is decided from the *typed* formats and modes of a layer's quantizers, never guessed
from tensor values. Exported schemes (weight / input activation):

===============  ======================================  ==================================
scheme           weight                                  input activation
===============  ======================================  ==================================
nvfp4            NVFP4, blocks of 16, calibrated global  NVFP4 blocks of 16, static global
nvfp4_w4a16      NVFP4, blocks of 16, calibrated global  source precision
fp8              FP8 E4M3, per tensor                    FP8 E4M3 static, per tensor
fp8_per_channel  FP8 E4M3, per output channel (axis 0)   FP8 E4M3 static, per tensor
int8             INT8, per output channel (axis 0)       INT8 static, per tensor
mxfp8            MXFP8, E8M0 scale per 32                MXFP8, per block of 32 at run time
mxfp4            MXFP4, E8M0 scale per 32                MXFP4, per block of 32 at run time
int4_w4a16       INT4 symmetric, blocks of 128 (or any)  source precision
===============  ======================================  ==================================

Built-in recipes: nvfp4, nvfp4_mse, nvfp4_gptq, nvfp4_sq -> nvfp4; int8, int8_sq -> int8;
mxfp4, mxfp4_sq -> mxfp4; int4_w4a16, int4_awq -> int4_w4a16; the others by their name.

SmoothQuant and AWQ scales are folded into the weights and the preceding norms/linears by
megaquant's calibration (``megaquant.calib.fold``), so their exports are plain ``int8`` /
``int4_w4a16`` weights: nothing is left to apply at run time.

MX activations have no calibrated scale: the serving engine computes each block's E8M0 scale from
the data with *its* rounding rule, which may differ from the recipe's ``scale_rule`` (each
layout says which rule its engines use: :func:`megaquant.export.layouts.activation_notes`).
Anything else (MX blocks other than 32, dynamic activation amax of an amax format, output
quantizers, E5M2, weight-only INT8/FP8/MX) raises ``ValueError`` naming
these: the exporter never writes a format it was not asked for.
"""

from __future__ import annotations

from megaquant.formats import FP8, INT4, INT8, MXFP4, MXFP8, NVFP4

SCHEMES = ("nvfp4", "nvfp4_w4a16", "fp8", "fp8_per_channel", "int8", "mxfp8", "mxfp4",
           "int4_w4a16")
MX_BLOCK = 32  # the OCP MX block every engine reads (vLLM, TensorRT-LLM, compressed-tensors)


def _describe(q) -> str:
    return "off" if q is None or not q.is_enabled else f"{q.fmt} ({q.mode})"


def _enabled(q):
    return q.fmt if q is not None and q.is_enabled else None


def _mx_scheme(w, i) -> str | None:
    """MXFP8/MXFP4 W/A with blocks of 32 (the activation's scale rule is checked by the layout)."""
    for fmt_cls, name in ((MXFP8, "mxfp8"), (MXFP4, "mxfp4")):
        if isinstance(w, fmt_cls) and isinstance(i, fmt_cls) \
                and w.block_size == MX_BLOCK and i.block_size == MX_BLOCK:
            return name
    return None


def scheme_of(w, i) -> str | None:
    """The scheme of a (weight format, input format or None) pair, or None if none is exportable."""
    if isinstance(w, NVFP4) and w.block_size == 16:
        if i is None:
            return "nvfp4_w4a16"
        return "nvfp4" if isinstance(i, NVFP4) and i.block_size == 16 else None
    if isinstance(w, FP8) and w.dtype == "e4m3" and isinstance(i, FP8) and i.dtype == "e4m3" \
            and i.axis is None:
        return {None: "fp8", 0: "fp8_per_channel"}.get(w.axis)
    if isinstance(w, INT8) and w.axis == 0 and isinstance(i, INT8) and i.axis is None:
        return "int8"
    if isinstance(w, INT4) and i is None:
        return "int4_w4a16"
    return _mx_scheme(w, i)


def classify(layer_name: str, weight_q, input_q, output_q) -> str:
    """The scheme of one layer from its quantizers (``TensorQuantizer`` or None)."""
    w, i = _enabled(weight_q), _enabled(input_q)
    scheme = None
    # an amax format with a dynamic (per-call) amax has no scale the layouts could hold; formats
    # without an amax (MX) compute block scales from the data in either mode, as engines do
    dynamic_amax = i is not None and i.needs_amax and input_q.mode != "static"
    if _enabled(output_q) is None and not dynamic_amax:
        scheme = scheme_of(w, i)
    if scheme is None:
        raise ValueError(
            f"layer {layer_name}: weight {_describe(weight_q)}, input {_describe(input_q)}, output "
            f"{_describe(output_q)} is not an exportable scheme; the exporter writes "
            f"{list(SCHEMES)} "
            "(see megaquant/export/schemes.py; output quantizers, dynamic activation amax, E5M2, "
            f"MX blocks other than {MX_BLOCK} and weight-only INT8/FP8/MX have no layout). "
            "Quantize "
            "with a built-in recipe (nvfp4*, fp8, fp8_per_channel, int8*, mxfp8, mxfp4*, "
            "int4_w4a16, int4_awq), or exclude the layer."
        )
    if weight_q.fmt.needs_amax and not weight_q.has_amax:
        raise ValueError(f"layer {layer_name}: the weight quantizer has no calibrated amax; "
                         "export a calibrated PTQ checkpoint")
    if i is not None and i.needs_amax and not input_q.has_amax:
        raise ValueError(f"layer {layer_name}: the input quantizer is static but uncalibrated; "
                         "run calibration (megaquant.quantize with a forward_loop) first")
    return scheme
