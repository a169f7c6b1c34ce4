"""MXFP8 / MXFP4 (OCP Microscaling v1.0): a shared power-of-two E8M0 scale per block of 32.

Block scale 2^e, e an integer clamped to [-127, 127] (E8M0 code e + 127), chosen by one of two
rules (all in float32, exponents read from the float bits, exact):

* ``"ocp"`` (OCP v1.0, default): e = floor(log2(block_amax)) - emax_elem (8 for E4M3, 2 for
  E2M1). The largest element may land above the element max and saturates.
* ``"round_up"`` (NVIDIA kernels): e = ceil(log2(block_amax / elem_max)); nothing saturates.

Elements: RNE(x / 2^e) on the E4M3 or E2M1 grid, saturating. An all-zero block gets e = -127
(code 0, the smallest scale; its elements are 0 either way). NaN/inf in a block gives the NaN
scale code 255, so the whole block dequantizes to NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from megaquant.formats import constants as C
from megaquant.formats import fused
from megaquant.formats.base import (
    QuantFormat,
    QuantizedTensor,
    check_block_size,
    check_choice,
    check_input,
)
from megaquant.formats.nvfp4 import e2m1_decode, e2m1_encode
from megaquant.formats.rounding import (
    block_amax,
    from_blocks,
    keep_mask,
    round_minifloat,
    to_blocks,
)

SCALE_RULES = ("ocp", "round_up")


def _exponent_bits(a: Tensor) -> Tensor:
    """Unbiased float32 exponent field of a >= 0 (int32); -127 for 0 and subnormals."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def mx_exponent(bamax: Tensor, round_up: bool, emax_elem: int, elem_max: float) -> Tensor:
    """Block scale exponent e (int32, clamped to [-127, 127]) from the block amax."""
    if round_up:
        v = bamax / elem_max
        has_mantissa = (v.view(torch.int32) & 0x7FFFFF) != 0
        e = _exponent_bits(v) + has_mantissa.to(torch.int32)  # ceil(log2 v)
        # below 2^-127 the exponent field no longer tells ceil(log2); the clamp gives -127 anyway
        e = torch.where(v <= 2.0**C.E8M0_EXP_MIN, torch.full_like(e, C.E8M0_EXP_MIN), e)
    else:
        e = _exponent_bits(bamax) - emax_elem  # floor(log2 amax); subnormal amax clamps below
    return torch.clamp(e, C.E8M0_EXP_MIN, C.E8M0_EXP_MAX)


def e8m0_to_float(e: Tensor, finite: Tensor) -> Tensor:
    """2^e as float32 (exact, 2^-127 is a subnormal), NaN where ``finite`` is False."""
    pow2 = ((torch.clamp(e, min=-126) + 127) << 23).view(torch.float32)
    pow2 = torch.where(e < -126, torch.full_like(pow2, 2.0**C.E8M0_EXP_MIN), pow2)
    return torch.where(finite, pow2, torch.full_like(pow2, float("nan")))


def _mx_values(xb: Tensor, round_up: bool, mant_bits: int, emin: int, emax_elem: int,
               elem_max: float):
    """(element values q, exponent e, float scale, finite-block mask, scaled input y)."""
    bamax = block_amax(xb)
    finite = torch.isfinite(bamax)
    e = mx_exponent(bamax, round_up, emax_elem, elem_max)
    scale = e8m0_to_float(e, finite)
    y = xb / scale
    return round_minifloat(y, mant_bits, emin, elem_max), e, scale, finite, y


@fused.blockwise(block_param=0)
def mx_kernel(x: Tensor, amax: Tensor | None, want_mask: bool, block_size: int, round_up: bool,
              mant_bits: int, emin: int, emax_elem: int, elem_max: float):
    """Pure MX fake quantization (eager reference and compile input); ``amax`` is unused."""
    xb = to_blocks(x.float(), block_size)
    q, _, scale, _, y = _mx_values(xb, round_up, mant_bits, emin, emax_elem, elem_max)
    out = from_blocks(q * scale, x.shape).to(x.dtype)  # inf in a block -> NaN scale
    return out, (from_blocks(keep_mask(y, elem_max), x.shape) if want_mask else None)


@dataclass(frozen=True)
class _MXFormat(QuantFormat):
    block_size: int = C.MX_BLOCK_SIZE
    scale_rule: str = "ocp"

    needs_amax: ClassVar[bool] = False
    _elem: ClassVar[tuple] = ()  # (mant_bits, emin, emax_elem, elem_max)

    def __post_init__(self):
        check_block_size(self, self.block_size)
        check_choice(self, "scale_rule", self.scale_rule, SCALE_RULES)

    def _params(self) -> tuple:
        return (self.block_size, self.scale_rule == "round_up", *self._elem)

    def _kernel(self, x: Tensor):
        return mx_kernel, self._params()

    def quantize(self, x: Tensor, amax: Tensor | None = None) -> QuantizedTensor:
        check_input(x, self)
        self._prepare_amax(x, amax)  # raises if an amax was given
        xb = to_blocks(x.detach().float(), self.block_size)
        q, e, _, finite, _ = _mx_values(xb, *self._params()[1:])
        scale = torch.where(finite, e + C.E8M0_BIAS, C.E8M0_NAN).squeeze(-1).to(torch.uint8)
        return QuantizedTensor(self._encode(from_blocks(q, x.shape)), scale, x.shape, x.dtype,
                               None, self.name)

    def dequantize(self, q: QuantizedTensor) -> Tensor:
        e = q.scale.to(torch.int32).unsqueeze(-1) - C.E8M0_BIAS
        scale = e8m0_to_float(e, q.scale.unsqueeze(-1) != C.E8M0_NAN)
        vals = to_blocks(self._decode(q.codes), self.block_size)
        return from_blocks(vals * scale, q.shape).to(q.dtype)


@dataclass(frozen=True)
class MXFP8(_MXFormat):
    """MXFP8: E4M3 elements, E8M0 scale per ``block_size`` (32) elements."""

    name: ClassVar[str] = "mxfp8"
    _elem: ClassVar[tuple] = (C.E4M3_MANT_BITS, C.E4M3_EMIN, C.E4M3_EMAX, C.E4M3_MAX)

    def _encode(self, q: Tensor) -> Tensor:
        return q.to(torch.float8_e4m3fn)  # exact: q is on the grid (NaN only in NaN-scale blocks)

    def _decode(self, codes: Tensor) -> Tensor:
        return codes.float()


@dataclass(frozen=True)
class MXFP4(_MXFormat):
    """MXFP4: E2M1 elements (uint8 4-bit codes), E8M0 scale per ``block_size`` (32) elements."""

    name: ClassVar[str] = "mxfp4"
    _elem: ClassVar[tuple] = (C.E2M1_MANT_BITS, C.E2M1_EMIN, C.E2M1_EMAX, C.E2M1_MAX)

    def _encode(self, q: Tensor) -> Tensor:
        return e2m1_encode(q)

    def _decode(self, codes: Tensor) -> Tensor:
        return e2m1_decode(codes)
