"""Symmetric integer formats: INT8 (per tensor / per channel) and INT4 (per block of 128).

scale = amax / QMAX (INT8: 127, INT4: 7; amax == 0 -> 1; non-finite amax -> NaN);
code = clamp(round_half_even(x / scale), -QMAX, QMAX); value = code * scale.

Integers cannot hold NaN, so the one unused code -(QMAX + 1) (-128 for INT8, -8 for INT4) marks an
element whose input was NaN or ±inf; it dequantizes to NaN. Other elements are unaffected unless
the scale itself is NaN (a dynamic amax over data containing NaN/inf, or an INT4 block holding
one), in which case everything sharing that scale is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from megaquant.formats import constants as C
from megaquant.formats import fused
from megaquant.formats.base import (
    PerAxisAmax,
    QuantFormat,
    QuantizedTensor,
    check_axis,
    check_block_size,
    check_input,
)
from megaquant.formats.rounding import (
    amax_per_axis,
    block_amax,
    from_blocks,
    keep_mask,
    scale_from_amax,
    to_blocks,
)


def _int_codes(x32: Tensor, amax: Tensor, qmax: int):
    """(float codes with -(qmax+1) at NaN/inf inputs, scale, scaled input y)."""
    scale = scale_from_amax(amax, float(qmax))
    y = x32 / scale
    q = torch.clamp(torch.round(y), -qmax, qmax)  # torch.round is round-half-to-even
    bad = torch.isnan(q) | torch.isinf(x32)
    return torch.where(bad, torch.full_like(q, -(qmax + 1)), q), scale, y


def _int_values(codes: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """code * scale, NaN at the marker code. The int32 round trip makes zeros +0, as in
    dequantize."""
    vals = codes.to(torch.int32).to(torch.float32) * scale
    return torch.where(codes == -(qmax + 1), torch.full_like(vals, float("nan")), vals)


def int_kernel(x: Tensor, amax: Tensor | None, want_mask: bool, qmax: int, axis: int | None):
    """Pure per-tensor/per-channel integer fake quantization (INT8)."""
    x32 = x.float()
    if amax is None:
        amax = amax_per_axis(x32, axis)
    codes, scale, y = _int_codes(x32, amax, qmax)
    out = _int_values(codes, scale, qmax).to(x.dtype)
    return out, (keep_mask(y, qmax) if want_mask else None)


@fused.blockwise(block_param=1)
def int_block_kernel(x: Tensor, amax: Tensor | None, want_mask: bool, qmax: int, block_size: int):
    """Pure blockwise integer fake quantization (INT4); ``amax`` is unused."""
    xb = to_blocks(x.float(), block_size)
    codes, scale, y = _int_codes(xb, block_amax(xb), qmax)
    out = from_blocks(_int_values(codes, scale, qmax), x.shape).to(x.dtype)
    return out, (from_blocks(keep_mask(y, qmax), x.shape) if want_mask else None)


@dataclass(frozen=True)
class INT8(PerAxisAmax, QuantFormat):
    """Symmetric INT8, codes in [-127, 127]; ``axis`` None = per tensor, else per channel."""

    axis: int | None = None

    name: ClassVar[str] = "int8"
    needs_amax: ClassVar[bool] = True

    def __post_init__(self):
        check_axis(self, self.axis)

    def _kernel(self, x: Tensor):
        return int_kernel, (C.INT8_MAX, self._axis(x))

    def quantize(self, x: Tensor, amax: Tensor | None = None) -> QuantizedTensor:
        check_input(x, self)
        amax = self._prepare_amax(x, amax)
        x32 = x.detach().float()
        if amax is None:
            amax = amax_per_axis(x32, self._axis(x))
        codes, scale, _ = _int_codes(x32, amax, C.INT8_MAX)
        return QuantizedTensor(codes.to(torch.int8), scale, x.shape, x.dtype, None, self.name)

    def dequantize(self, q: QuantizedTensor) -> Tensor:
        return _int_values(q.codes, q.scale, C.INT8_MAX).to(q.dtype)


@dataclass(frozen=True)
class INT4(QuantFormat):
    """Symmetric blockwise INT4, codes in [-7, 7] (stored unpacked in int8), float32 block
    scales."""

    block_size: int = C.INT4_BLOCK_SIZE

    name: ClassVar[str] = "int4"
    needs_amax: ClassVar[bool] = False

    def __post_init__(self):
        check_block_size(self, self.block_size)

    def _kernel(self, x: Tensor):
        return int_block_kernel, (C.INT4_MAX, self.block_size)

    def quantize(self, x: Tensor, amax: Tensor | None = None) -> QuantizedTensor:
        check_input(x, self)
        self._prepare_amax(x, amax)  # raises if an amax was given
        xb = to_blocks(x.detach().float(), self.block_size)
        codes, scale, _ = _int_codes(xb, block_amax(xb), C.INT4_MAX)
        codes = from_blocks(codes, x.shape).to(torch.int8)
        return QuantizedTensor(codes, scale.squeeze(-1), x.shape, x.dtype, None, self.name)

    def dequantize(self, q: QuantizedTensor) -> Tensor:
        codes = to_blocks(q.codes, self.block_size)
        vals = _int_values(codes, q.scale.unsqueeze(-1), C.INT4_MAX)
        return from_blocks(vals, q.shape).to(q.dtype)
