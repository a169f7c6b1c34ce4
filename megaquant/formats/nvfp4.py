"""NVFP4: E2M1 elements, an E4M3 scale per block of 16, and one FP32 global scale.

Two-level scaling (all arithmetic in float32, in this order):

    g = global_amax / (6 * 448)            global_amax == 0 (or g underflows) -> g = 1;
                                           non-finite global_amax -> g = NaN (all NaN)
    s = block_amax / (6 * g)               clamped to [2^-9, 448], rounded to E4M3 (RNE);
                                           block_amax == 0 -> s = 1; non-finite -> s = NaN
    code = round_e2m1(x / (s * g))         RNE (ties to even mantissa), saturating at 6
    value = code * s * g                   evaluated as (code * s) * g

Four over six (``scale_rule="4over6"``, Cook et al., arXiv 2512.02010): E2M1's top step is
4 -> 6, so a block whose max maps to 6 rounds values around 5 to 4 or 6 (an error of up to a
sixth of the max). Scaling the block so that its max maps to 4 instead (``s = block_amax / (4 g)``)
uses the finer part of the grid ({.., 3, 4}) for the large values at the cost of range. Per block
both candidates are quantized and the one with the smaller squared error is kept (ties: 6). The
stored layout is unchanged — codes and an E4M3 block scale — so any NVFP4 reader decodes it:
the choice is made when quantizing, never when decoding. Meant for weights (chosen once, at
calibration); engines compute activation block scales with the max-6 rule, so a recipe that asks
for it on an activation is refused.

A static (calibrated) global amax smaller than the data's makes block scales clamp at 448 and
elements saturate at 6 — the intended PTQ behaviour. NaN or inf anywhere in a block makes that
block's scale NaN, so the whole block of 16 dequantizes to NaN (E2M1 codes cannot hold NaN).
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
from megaquant.formats.rounding import (
    block_amax,
    from_blocks,
    keep_mask,
    round_minifloat,
    scale_from_amax,
    to_blocks,
)

_E2M1 = (C.E2M1_MANT_BITS, C.E2M1_EMIN, C.E2M1_MAX)


SCALE_RULES = ("max6", "4over6")


def nvfp4_block_scale(bamax: Tensor, g: Tensor, top: float = C.E2M1_MAX) -> Tensor:
    """E4M3-rounded block scale s (float32 values) from the block amax and global scale.

    ``top``: the E2M1 value the block max maps to (6, or 4 for the four-over-six candidate).
    """
    s = torch.clamp(bamax / (top * g), C.NVFP4_SCALE_MIN, C.E4M3_MAX)
    s = round_minifloat(s, C.E4M3_MANT_BITS, C.E4M3_EMIN, C.E4M3_MAX)
    s = torch.where(bamax == 0, torch.ones_like(s), s)
    return torch.where(torch.isfinite(bamax), s, torch.full_like(s, float("nan")))


def nvfp4_global_scale(global_amax: Tensor) -> Tensor:
    """g = global_amax / (6 * 448); 0 -> 1, non-finite -> NaN."""
    return scale_from_amax(global_amax, C.E2M1_MAX * C.E4M3_MAX)


def _nvfp4_values(xb: Tensor, g: Tensor | None, four_over_six: bool = False):
    """(E2M1 values q, block scale s, global scale g, scaled input y) for blocked float32 xb.

    ``g`` None: dynamic, from the amax of xb — taken as the max of the block amaxes (the same
    number, NaN included), which spares the compiled kernel a second pass over x.
    ``four_over_six``: per block, keep the max-6 or the max-4 scale, whichever errs less.
    """
    bamax = block_amax(xb)
    if g is None:
        g = nvfp4_global_scale(bamax.amax() if bamax.numel() else xb.new_zeros(()))
    s = nvfp4_block_scale(bamax, g)
    y = xb / (s * g)
    q = round_minifloat(y, *_E2M1)
    if four_over_six:
        s4 = nvfp4_block_scale(bamax, g, 4.0)
        y4 = xb / (s4 * g)
        q4 = round_minifloat(y4, *_E2M1)
        err6 = ((q * s * g - xb) ** 2).sum(-1, keepdim=True)
        err4 = ((q4 * s4 * g - xb) ** 2).sum(-1, keepdim=True)
        use4 = err4 < err6  # NaN errors compare False: a non-finite block keeps the 6 path
        s, y, q = torch.where(use4, s4, s), torch.where(use4, y4, y), torch.where(use4, q4, q)
    return q, s, g, y


@fused.blockwise(block_param=0)
def nvfp4_kernel(x: Tensor, g: Tensor | None, want_mask: bool, block_size: int,
                 four_over_six: bool = False):
    """Pure NVFP4 fake quantization (eager reference and compile input).

    Takes the global *scale* g (None: dynamic), computed outside from a static amax: a scalar
    derived once, not recomputed for every block inside the compiled loop.

    Returns (out, keep mask or None, block scales s). ``s`` is returned only so that inductor
    stores it: it then computes the ~30 scalar ops of the scale in a pass of their own,
    vectorised over 8 blocks at a time, instead of inline in the element loop, once per 8
    elements (~20% less CPU time, same numbers). ``fused.run_kernel`` drops it.
    """
    xb = to_blocks(x.float(), block_size)
    q, s, g, y = _nvfp4_values(xb, g, four_over_six)
    out = from_blocks(q * s * g, x.shape).to(x.dtype)  # inf in a block -> NaN scale s
    keep = from_blocks(keep_mask(y, C.E2M1_MAX), x.shape) if want_mask else None
    return out, keep, s


def e2m1_encode(q: Tensor) -> Tensor:
    """uint8 4-bit codes (sign << 3 | magnitude index) of values already on the E2M1 grid."""
    a = q.abs()
    # grid 0,.5,1,1.5 -> 0..3 (2a); 2,3 -> 4,5 (a+2); 4,6 -> 6,7 (a/2+4)
    idx = torch.where(a < 2, 2 * a, torch.where(a < 4, a + 2, a / 2 + 4))
    idx = torch.nan_to_num(idx, nan=0.0)  # NaN only occurs in blocks whose scale is NaN
    return (idx.to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)).to(torch.uint8)


def e2m1_decode(codes: Tensor) -> Tensor:
    """float32 signed E2M1 values of uint8 4-bit codes."""
    grid = torch.tensor(C.E2M1_GRID, dtype=torch.float32, device=codes.device)
    table = torch.cat([grid, -grid])  # codes 8..15 are the negatives (8 is -0.0)
    return table[codes.long()]


@dataclass(frozen=True)
class NVFP4(QuantFormat):
    """NVFP4 (E2M1 values, E4M3 block scales every ``block_size`` elements, FP32 global scale).

    ``scale_rule``: ``"max6"`` (the block max maps to 6, the standard) or ``"4over6"`` (per
    block, map the max to 4 or to 6, whichever gives the lower block error; same stored layout).
    """

    block_size: int = C.NVFP4_BLOCK_SIZE
    scale_rule: str = "max6"

    name: ClassVar[str] = "nvfp4"
    needs_amax: ClassVar[bool] = True  # the global amax

    def __post_init__(self):
        check_block_size(self, self.block_size)
        check_choice(self, "scale_rule", self.scale_rule, SCALE_RULES)

    @property
    def four_over_six(self) -> bool:
        return self.scale_rule == "4over6"

    def _amax_reduce(self, x32: Tensor) -> Tensor:
        return x32.abs().amax() if x32.numel() else x32.new_zeros(())

    def _kernel(self, x: Tensor):
        return nvfp4_kernel, (self.block_size, self.four_over_six)

    def _kernel_amax(self, amax: Tensor | None) -> Tensor | None:
        return None if amax is None else nvfp4_global_scale(amax)

    def quantize(self, x: Tensor, amax: Tensor | None = None) -> QuantizedTensor:
        check_input(x, self)
        amax = self._prepare_amax(x, amax)
        xb = to_blocks(x.detach().float(), self.block_size)
        g = None if amax is None else nvfp4_global_scale(amax)
        q, s, g, _ = _nvfp4_values(xb, g, self.four_over_six)
        codes = from_blocks(e2m1_encode(q), x.shape)
        scale = s.squeeze(-1).to(torch.float8_e4m3fn)  # exact: s is on the E4M3 grid (or NaN)
        return QuantizedTensor(codes, scale, x.shape, x.dtype, g, self.name)

    def dequantize(self, q: QuantizedTensor) -> Tensor:
        vals = to_blocks(e2m1_decode(q.codes), self.block_size)
        out = vals * q.scale.float().unsqueeze(-1) * q.global_scale
        return from_blocks(out, q.shape).to(q.dtype)
