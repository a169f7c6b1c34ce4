"""FP8 (E4M3 / E5M2) with one float32 scale per tensor or per channel.

scale = amax / FMT_MAX (amax == 0 -> 1; non-finite amax -> NaN); code = RNE(x / scale) on the
FP8 grid, saturating at ±FMT_MAX (torch's float8 cast would wrap to NaN, so we clamp first);
value = code * scale. ±inf inputs become NaN (E4M3 has no inf, and saturating them would hide
them); NaN stays NaN at its element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from megaquant.formats import constants as C
from megaquant.formats.base import (
    PerAxisAmax,
    QuantFormat,
    QuantizedTensor,
    check_axis,
    check_choice,
    check_input,
)
from megaquant.formats.rounding import (
    amax_per_axis,
    keep_mask,
    nan_where_inf,
    round_minifloat,
    scale_from_amax,
)

# dtype name -> (mantissa bits, min normal exponent, max value, torch storage dtype)
_FP8 = {
    "e4m3": (C.E4M3_MANT_BITS, C.E4M3_EMIN, C.E4M3_MAX, torch.float8_e4m3fn),
    "e5m2": (C.E5M2_MANT_BITS, C.E5M2_EMIN, C.E5M2_MAX, torch.float8_e5m2),
}


def _fp8_codes(x32: Tensor, amax: Tensor | None, mant_bits: int, emin: int, qmax: float, axis):
    """(rounded values on the FP8 grid, scale, scaled input y) — shared by quantize and kernel."""
    if amax is None:
        amax = amax_per_axis(x32, axis)
    scale = scale_from_amax(amax, qmax)
    y = x32 / scale
    return round_minifloat(y, mant_bits, emin, qmax), scale, y


def fp8_kernel(x: Tensor, amax: Tensor | None, want_mask: bool, mant_bits: int, emin: int,
               qmax: float, axis: int | None):
    """Pure FP8 fake quantization (eager reference and compile input)."""
    x32 = x.float()
    q, scale, y = _fp8_codes(x32, amax, mant_bits, emin, qmax, axis)
    out = nan_where_inf(q * scale, x32).to(x.dtype)
    return out, (keep_mask(y, qmax) if want_mask else None)


@dataclass(frozen=True)
class FP8(PerAxisAmax, QuantFormat):
    """FP8 E4M3 (max 448) or E5M2 (max 57344); ``axis`` None = per tensor, else per channel."""

    dtype: str = "e4m3"
    axis: int | None = None

    name: ClassVar[str] = "fp8"
    needs_amax: ClassVar[bool] = True

    def __post_init__(self):
        check_choice(self, "dtype", self.dtype, _FP8.keys())
        check_axis(self, self.axis)

    def _params(self, x: Tensor) -> tuple:
        mant_bits, emin, qmax, _ = _FP8[self.dtype]
        return (mant_bits, emin, qmax, self._axis(x))

    def _kernel(self, x: Tensor):
        return fp8_kernel, self._params(x)

    def quantize(self, x: Tensor, amax: Tensor | None = None) -> QuantizedTensor:
        check_input(x, self)
        amax = self._prepare_amax(x, amax)
        x32 = x.detach().float()
        q, scale, _ = _fp8_codes(x32, amax, *self._params(x))
        codes = nan_where_inf(q, x32).to(_FP8[self.dtype][3])  # exact: q is on the grid
        return QuantizedTensor(codes, scale, x.shape, x.dtype, None, self.name)

    def dequantize(self, q: QuantizedTensor) -> Tensor:
        return (q.codes.float() * q.scale).to(q.dtype)
