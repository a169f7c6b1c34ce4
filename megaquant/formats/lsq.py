"""Learnable scales (LSQ): fake quantization whose scale gets a gradient, not only its input.

The fixed-scale path (``QuantFormat.fake_quantize``) treats the amax as a constant and passes
the gradient straight through to ``x`` inside the representable range. Here the scale is a
parameter too (Esser et al., "Learned Step Size Quantization", 2020). With ``s`` a decode
scale, ``y = x / s`` and ``R`` the format's rounding (RNE on its grid):

    out = s * R(clamp(y, -Q, Q))
    d out / d x = 1 inside [-Q, Q], 0 where clipped            (the usual STE)
    d out / d s = R(y) - y  inside,   +-Q where clipped         (LSQ)

which is what autograd gives when ``R`` alone is replaced by the identity in backward
(:class:`_RoundSTE`); clamp and the products differentiate normally. Forward values are the
fixed-scale kernels' values bit for bit (same float32 operations in the same order).

What can be learned, per format (``check_learnable``):

* **NVFP4**: the per-tensor global amax (``g = amax / (6 * 448)``) and, for weights, the
  per-block amax that sets each E4M3 block scale ``s_b = E4M3(amax_b / (6 g))`` (the E4M3
  rounding is straight-through as well). The global amax alone only moves values where a block
  scale saturates at 448 or 2^-9: away from those limits ``s_b * g`` is ``amax_b / 6`` up to
  the E4M3 rounding, whatever ``g`` is - its gradient is then zero, as it should be.
* **INT8 / FP8**: the per-tensor (or per-channel) amax.
* **INT4**: the per-block amax of weights (no per-tensor scale exists).
* **MXFP8 / MXFP4**: nothing. Their block scales are powers of two (E8M0) computed from each
  block's own maximum; a learned real-valued scale would not be representable and rounding it
  to a power of two gives a zero gradient almost everywhere. Refused with that reason.

A learned amax is clamped below at ``_TINY`` so that an optimizer step cannot make the scale
zero or negative. LSQ's gradient scale factor ``1/sqrt(N * Q)`` is not applied: megaquant trains
with AdamW, whose per-parameter normalisation makes it irrelevant; scales get their own learning
rate instead (``megaquant.train.optim``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from megaquant.formats import constants as C
from megaquant.formats.base import QuantFormat, QuantizedTensor, check_input
from megaquant.formats.integer import _int_codes
from megaquant.formats.nvfp4 import e2m1_encode, nvfp4_block_scale
from megaquant.formats.rounding import block_amax, from_blocks, round_minifloat, to_blocks

_TINY = 1e-12


class _RoundSTE(torch.autograd.Function):
    """``fn(y)`` forward (exact values), identity backward."""

    @staticmethod
    def forward(ctx, y: Tensor, fn: Callable) -> Tensor:
        return fn(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _rne_int(y: Tensor) -> Tensor:
    return torch.round(y)  # round half to even


def _minifloat(mant_bits: int, emin: int, qmax: float) -> Callable:
    return lambda y: round_minifloat(y, mant_bits, emin, qmax)


_E2M1 = _minifloat(C.E2M1_MANT_BITS, C.E2M1_EMIN, C.E2M1_MAX)
_E4M3 = _minifloat(C.E4M3_MANT_BITS, C.E4M3_EMIN, C.E4M3_MAX)


def check_learnable(fmt: QuantFormat, per_block: bool, who: str = "quantizer") -> None:
    """ValueError naming ``who``, the format and what fits, when its scale cannot be learned."""
    name = fmt.name
    if name in ("mxfp8", "mxfp4"):
        raise ValueError(
            f"{who}: learnable_scales is not available for {name}: its block scales are powers "
            "of two (E8M0) taken from each block's maximum, so a learned real scale is not "
            "representable and its rounded gradient is zero. Learnable scales fit nvfp4 (global "
            "and per-block), int4 (per-block weights), int8 and fp8 (per tensor/channel); turn "
            "learnable_scales off for this recipe.")
    if per_block and name not in ("nvfp4", "int4"):
        raise ValueError(f"{who}: learnable_scales.per_block needs a block-scaled format "
                         f"(nvfp4, int4), not {name}; set per_block: false to learn its amax.")
    if not per_block and name == "int4":
        raise ValueError(f"{who}: int4 has no per-tensor scale to learn, only per-block weight "
                         "scales; set learnable_scales.per_block: true.")


def _scalar(x32: Tensor, scale: Tensor, qmax: float, rnd: Callable) -> Tensor:
    """s * R(clamp(x / s)) with straight-through R: the LSQ building block."""
    y = torch.clamp(x32 / scale, -qmax, qmax)
    return _RoundSTE.apply(y, rnd) * scale


def _positive(amax: Tensor) -> Tensor:
    return torch.clamp(amax.float(), min=_TINY)


def initial_block_amax(fmt: QuantFormat, w: Tensor) -> Tensor:
    """Per-block amax of weight ``w``: ``[..., n_blocks]`` float32 (the start of learning)."""
    return block_amax(to_blocks(w.detach().float(), fmt.block_size)).squeeze(-1).contiguous()


def learnable_fake_quantize(fmt: QuantFormat, x: Tensor, amax: Tensor | None,
                            blocks: Tensor | None = None) -> Tensor:
    """Fake-quantize ``x`` with gradients to ``x``, ``amax`` and the per-block ``blocks``.

    ``amax``: the format's static amax (per-tensor ``[]`` or per-channel keepdim shape);
    None for INT4. ``blocks``: ``[..., n_blocks]`` per-block amax (NVFP4/INT4 weights) or None
    (NVFP4: block amax from the data, not learned). Same values as ``fmt.fake_quantize``.
    """
    check_input(x, fmt)
    check_learnable(fmt, blocks is not None)
    x32 = x.float()
    name = fmt.name
    if name in ("int8", "fp8"):
        qmax = C.INT8_MAX if name == "int8" else fmt._params(x)[2]
        rnd = _rne_int if name == "int8" else _minifloat(*fmt._params(x)[:3])
        out = _scalar(x32, _positive(amax).reshape(fmt._amax_shape(x)) / qmax, qmax, rnd)
        return out.to(x.dtype)
    xb = to_blocks(x32, fmt.block_size)
    bamax = blocks.float().unsqueeze(-1) if blocks is not None else block_amax(xb).detach()
    if name == "int4":
        out = _scalar(xb, _positive(bamax) / C.INT4_MAX, C.INT4_MAX, _rne_int)
        return from_blocks(out, x.shape).to(x.dtype)
    g = _positive(amax) / (C.E2M1_MAX * C.E4M3_MAX)
    s = _RoundSTE.apply(torch.clamp(bamax / (C.E2M1_MAX * g), C.NVFP4_SCALE_MIN, C.E4M3_MAX),
                        _E4M3)
    s = torch.where(bamax == 0, torch.ones_like(s), s)
    y = torch.clamp(xb / (s * g), -C.E2M1_MAX, C.E2M1_MAX)
    out = _RoundSTE.apply(y, _E2M1) * s * g
    return from_blocks(out, x.shape).to(x.dtype)


def quantize_learned(fmt: QuantFormat, w: Tensor, amax: Tensor | None,
                     blocks: Tensor | None) -> QuantizedTensor:
    """``fmt.quantize(w, amax)``, but with learned per-block amax ``blocks`` when given.

    What the exporter writes for a weight whose block scales were learned: codes and E4M3
    (NVFP4) or float32 (INT4) block scales that decode to :func:`learnable_fake_quantize`'s
    values (the exporter checks that bit for bit before writing).
    """
    if blocks is None:
        return fmt.quantize(w, amax) if amax is not None else fmt.quantize(w)
    check_learnable(fmt, True)
    xb = to_blocks(w.detach().float(), fmt.block_size)
    bamax = _positive(blocks.detach()).unsqueeze(-1)
    if fmt.name == "int4":
        codes, scale, _ = _int_codes(xb, bamax, C.INT4_MAX)
        return QuantizedTensor(from_blocks(codes, w.shape).to(torch.int8), scale.squeeze(-1),
                               w.shape, w.dtype, None, fmt.name)
    g = _positive(amax.detach()) / (C.E2M1_MAX * C.E4M3_MAX)
    s = nvfp4_block_scale(bamax, g)
    q = round_minifloat(xb / (s * g), C.E2M1_MANT_BITS, C.E2M1_EMIN, C.E2M1_MAX)
    return QuantizedTensor(from_blocks(e2m1_encode(q), w.shape), s.squeeze(-1).to(
        torch.float8_e4m3fn), w.shape, w.dtype, g, fmt.name)
