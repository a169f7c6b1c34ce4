"""Effective bits of a quantized weight: element bits plus the scale bits spread over elements.

Counted honestly, per weight tensor of ``rows x cols`` elements (DECISIONS "Mixed precision":
weights and their scales; activations are reported beside, not counted):

==================  =======================================================
unquantized         16 (the bf16/fp16 weight an engine keeps)
FP8 / INT8          8, plus one fp32 scale per tensor or per channel
NVFP4               4 + 8/16 (an E4M3 scale per block of 16) + one fp32 global scale
MXFP4 / MXFP8       4 or 8, + 8/32 (an E8M0 scale per block of 32)
INT4 (blocks)       4 + 16/block (a 16-bit scale per block, as the exporters write it)
==================  =======================================================
"""

from __future__ import annotations

UNQUANTIZED_BITS = 16.0
FP32_BITS = 32.0

# format name -> (element bits, bits of one block scale); block size is the format's own.
_BLOCK_FORMATS = {"nvfp4": (4, 8), "mxfp4": (4, 8), "mxfp8": (8, 8), "int4": (4, 16)}
_PER_AXIS_FORMATS = {"fp8": 8, "int8": 8}


def weight_bits(fmt, rows: int, cols: int) -> float:
    """Total bits of one ``rows x cols`` weight stored in ``fmt`` (None: unquantized)."""
    n = rows * cols
    if fmt is None:
        return UNQUANTIZED_BITS * n
    if fmt.name in _BLOCK_FORMATS:
        elem, scale = _BLOCK_FORMATS[fmt.name]
        blocks = rows * -(-cols // fmt.block_size)
        global_scale = FP32_BITS if fmt.name == "nvfp4" else 0.0
        return elem * n + scale * blocks + global_scale
    if fmt.name in _PER_AXIS_FORMATS:
        scales = 1 if fmt.axis is None else rows
        return _PER_AXIS_FORMATS[fmt.name] * n + FP32_BITS * scales
    raise ValueError(f"no bit count for format {fmt.name!r}; known: "
                     f"{sorted([*_BLOCK_FORMATS, *_PER_AXIS_FORMATS])}")
