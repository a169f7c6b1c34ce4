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
from megaquant.formats import fused
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

    NVFP4 and INT4 (the block formats) run :class:`_LSQBlocks`: one fused kernel forward and
    one backward, compiled by the same policy as the fixed-scale kernels; INT8/FP8 run the
    autograd chain of :func:`learnable_fake_quantize_eager` (the reference).
    """
    check_input(x, fmt)
    check_learnable(fmt, blocks is not None)
    if fmt.name in ("nvfp4", "int4"):
        return _LSQBlocks.apply(x, amax if fmt.name == "nvfp4" else None, blocks, fmt.name,
                                fmt.block_size)
    return learnable_fake_quantize_eager(fmt, x, amax, blocks)


def learnable_fake_quantize_eager(fmt: QuantFormat, x: Tensor, amax: Tensor | None,
                                  blocks: Tensor | None = None) -> Tensor:
    """The reference: LSQ as plain torch autograd over the element-wise chain (~10 ops).

    Same values and, up to float32 rounding, the same gradients as the fused path; kept for
    INT8/FP8 and as what the fused kernels are tested against.
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


# --------------------------------------------------------------------------------------------
# Fused NVFP4 / INT4 path. On the flat ``[rows, block]`` view (one row per block, see
# formats/fused.py) with ``s`` the per-row block scale and ``g`` the global scale (1 for INT4):
#
#   forward   y = clamp(x / (s g), -Q, Q),  q = R(y),  out = (q s) g       (the eager values)
#   backward  dx = dout where -Q <= x / (s g) <= Q, else 0                  (STE, as clamp)
#             dc_row = sum_row dout * r,  r = q - y inside, q where clipped (d out / d(s g))
#
# and the rest is per row (1/block of the elements), in eager torch: ds = g dc, and for NVFP4
# s = E4M3(clamp(t, 2^-9, 448)) with t = bamax / (6 g) (straight-through E4M3, no gradient where
# clamped or where bamax = 0), so d bamax = ds / (6 g) and dg = sum(s dc) - sum(ds bamax / (6 g^2)),
# d amax = dg / 2688. These are the eager chain's derivatives, summed in another order: equal up to
# float32 rounding (tests/qat/test_lsq.py). The backward kernel recomputes y and q from the
# saved input instead of the eager chain saving ~10 full-size intermediates.


def _round(y: Tensor, kind: str) -> Tensor:
    return torch.round(y) if kind == "int4" else round_minifloat(y, C.E2M1_MANT_BITS,
                                                                  C.E2M1_EMIN, C.E2M1_MAX)


def _nvfp4_scale(bamax: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(block scale s, its pre-clamp value t) exactly as the eager chain computes them."""
    t = bamax / (C.E2M1_MAX * g)
    s = round_minifloat(torch.clamp(t, C.NVFP4_SCALE_MIN, C.E4M3_MAX), C.E4M3_MANT_BITS,
                        C.E4M3_EMIN, C.E4M3_MAX)
    return torch.where(bamax == 0, torch.ones_like(s), s), t


@fused.blockwise(block_param=0)
def lsq_forward_kernel(x: Tensor, s: Tensor | None, g: Tensor, kind: str, qmax: float):
    """(out, s, bamax) on rows; ``s`` None: NVFP4 block scales from the data (then returned)."""
    x32 = x.float()
    bamax = None
    if s is None:
        bamax = block_amax(x32)
        s = _nvfp4_scale(bamax, g)[0]
    y = torch.clamp(x32 / (s * g), -qmax, qmax)
    return (_round(y, kind) * s * g).to(x.dtype), s, bamax


@fused.blockwise(block_param=0)
def lsq_backward_kernel(x: Tensor, grad: Tensor, s: Tensor, g: Tensor, kind: str, qmax: float):
    """(dx, dc per row): the STE gradient of x and d loss / d(s g) of each row."""
    yraw = x.float() / (s * g)
    inside = (yraw >= -qmax) & (yraw <= qmax)
    y = torch.clamp(yraw, -qmax, qmax)
    q = _round(y, kind)
    dc = (grad.float() * torch.where(inside, q - y, q)).sum(-1, keepdim=True)
    return torch.where(inside, grad, grad.new_zeros(())), dc


# ``auto`` compiles these kernels from 2^14 elements, not from MEGAQUANT_COMPILE_MIN_NUMEL's
# 2^18: eager, the backward recomputes the forward's values (two passes of ~15 element-wise ops),
# which made a learnable-scale step ~2x the fixed one at SmolLM2's activation sizes (~1e5
# elements, below 2^18); compiled, it costs about what the fixed path does. The rows dimension is
# dynamic, so each variant still compiles once per process; the tiny test models stay eager.
_LSQ_COMPILE_MIN_NUMEL = 1 << 14


def _run(kernel, rows: tuple[Tensor, ...], *args):
    """``kernel(*rows, *args)``, compiled on the rows (dynamic count) when the policy says so."""
    if kernel not in fused._failed and fused.use_compiled(rows[0], _LSQ_COMPILE_MIN_NUMEL):
        try:
            fn = fused._get_compiled(kernel)
            for r in rows:
                if r is not None:
                    torch._dynamo.maybe_mark_dynamic(r, 0)
                    torch._dynamo.mark_static(r, 1)
            return fn(*rows, *args)
        except Exception as err:  # noqa: BLE001 - compile errors surface at the first call
            fused._failed.add(kernel)
            import warnings

            warnings.warn(f"megaquant: compiling {kernel.__name__} failed ({type(err).__name__}: "
                          f"{err}); falling back to the eager kernel (slower, same numbers)",
                          RuntimeWarning, stacklevel=2)
    return kernel(*rows, *args)


class _LSQBlocks(torch.autograd.Function):
    """NVFP4 / INT4 LSQ fake quantization: fused kernels, saves x and the per-row scales."""

    @staticmethod
    def forward(ctx, x, amax, blocks, kind: str, block: int):
        qmax = C.INT4_MAX if kind == "int4" else C.E2M1_MAX
        with torch.no_grad():
            g = torch.ones((), device=x.device) if kind == "int4" else \
                _positive(amax) / (C.E2M1_MAX * C.E4M3_MAX)
            bamax = None if blocks is None else blocks.detach().float().reshape(-1, 1)
            s = None
            if kind == "int4":
                s = _positive(bamax) / C.INT4_MAX
            elif bamax is not None:
                s = _nvfp4_scale(bamax, g)[0]
            rows = fused._to_rows(x.detach(), block)
            out, s, data_bamax = _run(lsq_forward_kernel, (rows, s), g, kind, qmax)
        ctx.save_for_backward(x.detach(), s, g, data_bamax if bamax is None else bamax,
                              amax.detach() if amax is not None else None)
        ctx.kind, ctx.block, ctx.qmax, ctx.blocks_shape = kind, block, qmax, \
            None if blocks is None else blocks.shape
        return fused._from_rows(out, x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, s, g, bamax, amax = ctx.saved_tensors
        with torch.no_grad():
            dx, dc = _run(lsq_backward_kernel, (fused._to_rows(x, ctx.block),
                                                fused._to_rows(grad, ctx.block), s), g,
                          ctx.kind, ctx.qmax)
            dx = fused._from_rows(dx, x.shape)
            if ctx.kind == "int4":  # s = max(bamax, tiny) / 7
                dblocks = dc / C.INT4_MAX * (bamax >= _TINY)
                return dx, None, dblocks.reshape(ctx.blocks_shape), None, None
            ds = g * dc
            t = _nvfp4_scale(bamax, g)[1]
            ind = (t >= C.NVFP4_SCALE_MIN) & (t <= C.E4M3_MAX) & (bamax != 0)
            dt = torch.where(ind, ds, torch.zeros((), device=ds.device))
            dg = (s * dc).sum() - (dt * bamax / (C.E2M1_MAX * g * g)).sum()
            damax = dg / (C.E2M1_MAX * C.E4M3_MAX) * (amax.float() >= _TINY)
            dblocks = None
            if ctx.blocks_shape is not None:
                dblocks = (dt / (C.E2M1_MAX * g)).reshape(ctx.blocks_shape)
        return dx, damax.reshape(amax.shape).to(amax.dtype), dblocks, None, None
