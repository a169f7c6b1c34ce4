"""What a quantized layer's quantizers amount to, as one of the schemes the exporter writes.

A scheme is decided from the *typed* formats and modes of a layer's quantizers, never guessed
from tensor values. Exported schemes (weight / activation):

=================  ==========================================  ============================
scheme             weight                                      input activation
=================  ==========================================  ============================
nvfp4              NVFP4, blocks of 16, calibrated global      NVFP4 blocks of 16, static global
nvfp4_w4a16        NVFP4, blocks of 16, calibrated global      source precision
fp8                FP8 E4M3, per tensor                        FP8 E4M3 static, per tensor
fp8_per_channel    FP8 E4M3, per output channel (axis 0)       FP8 E4M3 static, per tensor
int4_w4a16         INT4 symmetric, blocks of 128 (or any)      source precision
=================  ==========================================  ============================

Anything else (INT8, MX formats, dynamic activation amax, output quantizers, E5M2) raises
``ValueError`` naming these: the exporter never writes a format it was not asked for.
"""

from __future__ import annotations

from megaquant.formats import FP8, INT4, NVFP4

SCHEMES = ("nvfp4", "nvfp4_w4a16", "fp8", "fp8_per_channel", "int4_w4a16")


def _describe(q) -> str:
    return "off" if q is None or not q.is_enabled else f"{q.fmt} ({q.mode})"


def classify(layer_name: str, weight_q, input_q, output_q) -> str:
    """The scheme of one layer from its quantizers (``TensorQuantizer`` or None)."""
    w = weight_q.fmt if weight_q is not None and weight_q.is_enabled else None
    i = input_q.fmt if input_q is not None and input_q.is_enabled else None
    scheme = None
    if output_q is not None and output_q.is_enabled:
        scheme = None
    elif i is not None and input_q.mode != "static":
        scheme = None  # dynamic activation scales: not in the formats we write
    elif isinstance(w, NVFP4) and w.block_size == 16:
        if i is None:
            scheme = "nvfp4_w4a16"
        elif isinstance(i, NVFP4) and i.block_size == 16:
            scheme = "nvfp4"
    elif isinstance(w, FP8) and w.dtype == "e4m3" and isinstance(i, FP8) and i.dtype == "e4m3" \
            and i.axis is None:
        scheme = {None: "fp8", 0: "fp8_per_channel"}.get(w.axis)
    elif isinstance(w, INT4) and i is None:
        scheme = "int4_w4a16"
    if scheme is None:
        raise ValueError(
            f"layer {layer_name}: weight {_describe(weight_q)}, input {_describe(input_q)}, output "
            f"{_describe(output_q)} is not an exportable scheme; the exporter writes {list(SCHEMES)} "
            "(see megaquant/export/schemes.py). Quantize with one of the recipes nvfp4, "
            "nvfp4_w4a16, fp8, fp8_per_channel, int4_w4a16, or exclude the layer."
        )
    if weight_q.fmt.needs_amax and not weight_q.has_amax:
        raise ValueError(f"layer {layer_name}: the weight quantizer has no calibrated amax; "
                         "export a calibrated PTQ checkpoint")
    if i is not None and not input_q.has_amax:
        raise ValueError(f"layer {layer_name}: the input quantizer is static but uncalibrated; "
                         "run calibration (megaquant.quantize with a forward_loop) first")
    return scheme
