"""Pure float32 rounding helpers shared by all formats.

Everything here is elementwise float32 arithmetic (plus integer bit views) so that one function
body serves as the eager reference *and* as the input to ``torch.compile``: the compiled kernel
runs the same IEEE operations, so it is bit-identical (tested in ``tests/formats``).

Why arithmetic rounding instead of ``tensor.to(torch.float8_e4m3fn)``: the cast wraps to NaN
instead of saturating, does not exist for E2M1, and is a slow scalar loop on CPU; the expression
below vectorises and fuses into one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EXP_MASK = 0x7F800000  # float32 exponent field


def pow2_floor(a: Tensor) -> Tensor:
    """2^floor(log2(a)) for normal positive float32 ``a``; 0 for 0/subnormals, inf for inf/NaN.

    Read off the exponent bits (exact), unlike ``log2`` whose last-ulp error would misplace values
    next to a power of two.
    """
    return (a.view(torch.int32) & _EXP_MASK).view(torch.float32)


def round_minifloat(y: Tensor, mant_bits: int, emin: int, max_value: float) -> Tensor:
    """Round float32 ``y`` to the nearest value of a minifloat, ties to even, saturating.

    The minifloat has ``mant_bits`` explicit mantissa bits, minimum normal exponent ``emin``
    (subnormals below it, i.e. a fixed spacing of 2^(emin - mant_bits)) and largest finite value
    ``max_value``. |y| > max_value (inf included) gives ±max_value; NaN stays NaN; the sign of
    zero follows ``y``.
    """
    a = torch.clamp(y.abs(), max=max_value)  # clamp first: the spacing of inf would be inf
    # step = spacing of the grid around a, a power of two: a / step and a * (1 / step) are exact,
    # so round() alone decides (round half to even)
    if (mant_bits, emin, max_value) == (1, 0, 6.0):
        # E2M1 has three binades: spacing 0.5 below 2, 1 below 4, 2 up to 6. Compares and
        # multiplies vectorise better than the bit view and division below (same numbers).
        inv_step = torch.where(a < 2, 2.0, torch.where(a < 4, 1.0, 0.5))
        step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
        q = torch.round(a * inv_step) * step
    else:
        step = torch.clamp(pow2_floor(a), min=2.0**emin) * 2.0**-mant_bits
        q = torch.round(a / step) * step
    return torch.copysign(q, y)


def scale_from_amax(amax: Tensor, qmax: float) -> Tensor:
    """Decode scale ``amax / qmax`` (float32), with the two edge rules shared by all formats.

    * a scale of 0 (amax == 0, or an amax so small the division underflows) becomes 1, so an
      all-zero tensor quantizes to zeros instead of 0/0 = NaN;
    * a non-finite amax gives a NaN scale, so NaN/inf in the data poison everything sharing the
      scale instead of silently saturating to finite values.
    """
    scale = amax / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def nan_where_inf(out: Tensor, x: Tensor) -> Tensor:
    """Turn outputs at ±inf inputs into NaN: saturating inf to a finite max would hide it."""
    # abs() == inf instead of isinf(): a plain compare vectorises in the compiled kernel
    return torch.where(x.abs() == float("inf"), torch.full_like(out, float("nan")), out)


def keep_mask(y: Tensor, limit: float) -> Tensor:
    """STE keep mask of scaled values ``y``: 1 where ``|y| <= limit`` (NaN too), 0 where clipped.

    uint8 0/1 when compiled (``fused`` views it as bool): inductor's CPU code stores a bool vector
    through a scalar loop, which made the mask cost more than the whole quantization; a 0/1 select
    narrowed to uint8 is stored as a vector. Eagerly the plain bool (no int64 temporary).
    """
    clipped = y.abs() > limit
    if torch.compiler.is_compiling():
        return torch.where(clipped, 0, 1).to(torch.uint8)
    return ~clipped


def to_blocks(x: Tensor, block_size: int) -> Tensor:
    """View float32 ``x`` as [..., n_blocks, block_size] along the last dim, zero-padding the tail.

    Zero padding never changes a block's amax, and :func:`from_blocks` drops it again.
    """
    if x.dim() == 0:
        x = x.reshape(1)
    pad = (-x.shape[-1]) % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def from_blocks(xb: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_blocks`: flatten the blocks and drop the padding, back to ``shape``."""
    flat = xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])
    last = shape[-1] if len(shape) else 1
    return flat[..., :last].reshape(shape)


def block_amax(xb: Tensor) -> Tensor:
    """Per-block amax [..., n_blocks, 1]; NaN/inf propagate (max reductions propagate NaN)."""
    return xb.abs().amax(dim=-1, keepdim=True)


def amax_per_axis(x32: Tensor, axis: int | None) -> Tensor:
    """amax over the whole tensor ([]), or per channel along ``axis`` (keepdim shape)."""
    a = x32.abs()
    if axis is None:
        return a.amax() if a.numel() else a.new_zeros(())
    dims = [d for d in range(a.dim()) if d != axis]
    return a.amax(dim=dims, keepdim=True) if dims else a


def channel_shape(shape: torch.Size, axis: int | None) -> tuple[int, ...]:
    """The keepdim amax shape for per-channel quantization along ``axis`` ([] per tensor)."""
    if axis is None:
        return ()
    return tuple(s if d == axis else 1 for d, s in enumerate(shape))


def normalize_axis(axis: int | None, ndim: int, who: str) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{who}: axis={axis} is out of range for a {ndim}-D tensor.")
    return axis % ndim
