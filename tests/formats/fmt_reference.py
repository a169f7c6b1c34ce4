"""Slow, independent reference numerics for the format tests (numpy; no megaquant code).

Every representable grid is *enumerated* from the bit layout (all E4M3/E5M2 codes, the E2M1
codes, the integers) and each scaled value is rounded by an explicit nearest-neighbour search in
float64 with ties to the even code, saturating at the largest magnitude. Scale arithmetic follows
the spec literally in numpy float32 (the formats compute in float32), so results must match the
torch implementation bit for bit.
"""

from __future__ import annotations

import math

import numpy as np


def minifloat_magnitudes(exp_bits: int, mant_bits: int, bias: int, drop_top: int) -> np.ndarray:
    """All non-negative finite values of a minifloat, indexed by their code (sorted ascending).

    ``drop_top`` codes at the top of the range are NaN/inf encodings and are left out.
    """
    vals = []
    for code in range(2 ** (exp_bits + mant_bits)):
        e, m = code >> mant_bits, code & ((1 << mant_bits) - 1)
        if e == 0:
            v = m / 2**mant_bits * 2.0 ** (1 - bias)
        else:
            v = (1 + m / 2**mant_bits) * 2.0 ** (e - bias)
        vals.append(v)
    vals = np.array(vals[: len(vals) - drop_top], dtype=np.float64)
    assert np.all(np.diff(vals) > 0)
    return vals


E4M3 = minifloat_magnitudes(4, 3, 7, drop_top=1)  # S.1111.111 is NaN
E5M2 = minifloat_magnitudes(5, 2, 15, drop_top=4)  # exponent 11111 is inf/NaN
E2M1 = minifloat_magnitudes(2, 1, 1, drop_top=0)
assert E4M3[-1] == 448 and E5M2[-1] == 57344 and E2M1[-1] == 6


def int_grid(qmax: int) -> np.ndarray:
    return np.arange(qmax + 1, dtype=np.float64)


def nearest(y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Round float64 ``y`` to the nearest ±grid value; ties -> even code index; saturate; NaN
    stays."""
    a = np.abs(y)
    out = np.full_like(a, np.nan)
    ok = ~np.isnan(a)
    a_ok = np.minimum(a[ok], grid[-1])
    hi = np.clip(np.searchsorted(grid, a_ok, side="left"), 0, len(grid) - 1)
    lo = np.clip(hi - 1, 0, None)
    d_lo, d_hi = a_ok - grid[lo], grid[hi] - a_ok
    pick = np.where(d_lo < d_hi, lo, hi)
    tie = d_lo == d_hi
    pick = np.where(tie, np.where(lo % 2 == 0, lo, hi), pick)
    out[ok] = grid[pick]
    return np.copysign(out, y)


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _scale(amax, qmax: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        s = _f32(amax) / np.float32(qmax)
    s = np.where(s == 0, np.float32(1), s)
    return np.where(np.isfinite(_f32(amax)), s, np.float32(np.nan)).astype(np.float32)


def _blocks(x: np.ndarray, bs: int) -> np.ndarray:
    x = x.reshape(1) if x.ndim == 0 else x
    pad = (-x.shape[-1]) % bs
    x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), np.float32)], -1) if pad else x
    return x.reshape(x.shape[:-1] + (x.shape[-1] // bs, bs))


def _unblock(xb: np.ndarray, shape) -> np.ndarray:
    flat = xb.reshape(xb.shape[:-2] + (-1,))
    return flat[..., : (shape[-1] if len(shape) else 1)].reshape(shape)


def _finish(q, scale_mul, x, y, qmax):
    """(dequantized float32 values, clip mask); ±inf inputs -> NaN."""
    with np.errstate(all="ignore"):
        out = scale_mul(_f32(q))
        out = np.where(np.isinf(x), np.float32(np.nan), out).astype(np.float32)
        keep = ~(np.abs(y) > qmax)
    return out, keep


def ref_fp8(x, amax, kind: str, axis):
    """FP8 per tensor (axis None) or per channel; x float32 numpy array."""
    grid = E4M3 if kind == "e4m3" else E5M2
    if amax is None:
        dims = tuple(d for d in range(x.ndim) if d != axis) if axis is not None else None
        amax = np.max(np.abs(x), axis=dims, keepdims=axis is not None)
    scale = _scale(amax, grid[-1])
    with np.errstate(all="ignore"):
        y = x / scale
    q = nearest(y.astype(np.float64), grid)
    return _finish(q, lambda q: q * scale, x, y, grid[-1])


def ref_int(x, amax, qmax: int, axis):
    dims = tuple(d for d in range(x.ndim) if d != axis) if axis is not None else None
    if amax is None:
        amax = np.max(np.abs(x), axis=dims, keepdims=axis is not None)
    scale = _scale(amax, qmax)
    with np.errstate(all="ignore"):
        y = x / scale
    q = nearest(y.astype(np.float64), int_grid(qmax)) + 0.0  # +0.0: integer codes have no -0
    return _finish(q, lambda q: q * scale, x, y, qmax)


def ref_int4(x, bs: int = 128):
    xb = _blocks(x, bs)
    out, keep = ref_int(xb, np.max(np.abs(xb), -1, keepdims=True), 7, axis=None)
    return _unblock(out, x.shape), _unblock(keep, x.shape)


def _e4m3_scale(s: np.ndarray) -> np.ndarray:
    return _f32(nearest(np.asarray(s, np.float64), E4M3))


def ref_nvfp4(x, global_amax=None, bs: int = 16, top: float = 6.0):
    """Returns (values, keep mask, block scales s, global scale g); ``top``: the E2M1 value a
    block max maps to (4 for NVFP4's four-over-six candidate)."""
    xb = _blocks(x, bs)
    if global_amax is None:
        global_amax = np.max(np.abs(x)) if x.size else np.float32(0)
    g = _scale(global_amax, 6 * 448)
    bamax = np.max(np.abs(xb), -1, keepdims=True)
    with np.errstate(all="ignore"):
        s = np.clip(bamax / (np.float32(top) * g), np.float32(2.0**-9), np.float32(448))
    s = _e4m3_scale(s)
    s = np.where(bamax == 0, np.float32(1), s)
    s = np.where(np.isfinite(bamax), s, np.float32(np.nan)).astype(np.float32)
    with np.errstate(all="ignore"):
        y = xb / (s * g)
    q = nearest(y.astype(np.float64), E2M1)
    out, keep = _finish(q, lambda q: (q * s) * g, xb, y, 6.0)
    return _unblock(out, x.shape), _unblock(keep, x.shape), s[..., 0], g


def _mx_exp(a: float, rule: str, emax_elem: int, elem_max: float) -> int:
    if rule == "ocp":
        if a == 0:
            return -127
        m, e = math.frexp(a)  # a = m 2^e, m in [0.5, 1): floor(log2 a) = e - 1
        return max(-127, min(127, e - 1 - emax_elem))
    v = float(np.float32(a) / np.float32(elem_max))
    if v == 0:
        return -127
    m, e = math.frexp(v)  # ceil(log2 v) = e - 1 if v is a power of two else e
    return max(-127, min(127, e - 1 if m == 0.5 else e))


def ref_mx(x, elem: str, rule: str = "ocp", bs: int = 32):
    """Returns (values, keep mask, E8M0 exponent per block or None for NaN blocks)."""
    grid, emax_elem = (E4M3, 8) if elem == "e4m3" else (E2M1, 2)
    xb = _blocks(x, bs)
    bamax = np.max(np.abs(xb), -1)
    exps = np.zeros(bamax.shape, np.float64)
    for i, a in np.ndenumerate(bamax):
        exps[i] = _mx_exp(float(a), rule, emax_elem, grid[-1]) if np.isfinite(a) else np.nan
    scale = _f32(np.where(np.isnan(exps), np.nan, 2.0 ** np.nan_to_num(exps)))[..., None]
    with np.errstate(all="ignore"):
        y = xb / scale
    q = nearest(y.astype(np.float64), grid)
    out, keep = _finish(q, lambda q: q * scale, xb, y, grid[-1])
    return _unblock(out, x.shape), _unblock(keep, x.shape), exps
