"""Each format against the independent grid-search reference (tests/formats/reference.py).

Tolerance: none — values, signs of zero and NaN positions must match bit for bit, for float32,
bfloat16 and float16 inputs, on random data (magnitudes 1e-6 .. 1e4, last dims that are not a
multiple of the block), exact ties, saturation, all-zero blocks, subnormal scales and NaN/inf.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaquant.formats import FP8, INT4, INT8, MXFP4, MXFP8, NVFP4
from tests.formats import fmt_reference as R
from tests.formats.fmt_helpers import (  # noqa: F401  (eager_by_default: autouse fixture)
    assert_bitwise,
    eager_by_default,
    random_tensor,
    ref_to_torch,
    to_np,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(4, 64), (3, 50), (2, 3, 40), (130,), (5, 300)]


def _special_tensor(dtype) -> torch.Tensor:
    """Random data with an all-zero row, tiny and huge rows, and NaN/inf sprinkled in."""
    x = random_tensor((6, 96), torch.float32)
    x[1] = 0.0
    x[2] *= 1e-10  # tiny blocks: E4M3-subnormal NVFP4 block scales, small E8M0 exponents
    x[3, :40] = 0.0
    x[4, 5], x[4, 70], x[5, 33] = float("nan"), float("inf"), -float("inf")
    return x.to(dtype)


def _tie_tensor(mags, block: int, dtype) -> torch.Tensor:
    """Exact midpoints between neighbouring grid magnitudes (both signs), in blocks that each
    contain the grid max, so with scale 1 every element is an exact tie (or the max)."""
    mags = torch.tensor(mags, dtype=torch.float64)
    mids = torch.cat([(mags[1:] + mags[:-1]) / 2, -(mags[1:] + mags[:-1]) / 2]).float()
    per = block - 1
    n_blocks = -(-mids.numel() // per)
    body = torch.full((n_blocks * per,), float(mags[-1]))
    body[: mids.numel()] = mids
    x = torch.cat([body.view(n_blocks, per), torch.full((n_blocks, 1), float(mags[-1]))], 1)
    return x.to(dtype)


def _inputs(dtype):
    yield from (random_tensor(s, dtype, gen_seed=i) for i, s in enumerate(SHAPES))
    yield _special_tensor(dtype)


def _check(fmt, x, amax, ref_values, ref_keep=None):
    out = fmt.fake_quantize(x, amax)
    assert_bitwise(out, ref_to_torch(ref_values, x.dtype), f"{fmt} fake_quantize {tuple(x.shape)}")
    assert_bitwise(fmt.dequantize(fmt.quantize(x, amax)), out, f"{fmt} dequantize(quantize)")
    if ref_keep is not None:
        xg = x.clone().requires_grad_(True)
        up = torch.randn(x.shape).to(x.dtype)
        fmt.fake_quantize(xg, amax).backward(up)
        want = torch.where(torch.from_numpy(ref_keep), up, torch.zeros((), dtype=x.dtype))
        assert_bitwise(xg.grad, want, f"{fmt} STE gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_fp8_matches_reference(kind, dtype):
    for x in _inputs(dtype):
        xn = to_np(x)
        _check(FP8(kind), x, None, *R.ref_fp8(xn, None, kind, None))
        amax = torch.tensor(50.0)  # static, smaller than the data's amax: saturation
        _check(FP8(kind), x, amax, *R.ref_fp8(xn, np.float32(50.0), kind, None))
        if x.dim() >= 2:
            _check(FP8(kind, axis=0), x, None, *R.ref_fp8(xn, None, kind, 0))
    grid = R.E4M3 if kind == "e4m3" else R.E5M2
    ties = _tie_tensor(grid, 64, dtype)  # amax = max -> scale 1: all exact ties
    _check(FP8(kind), ties, None, *R.ref_fp8(to_np(ties), None, kind, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_matches_reference(dtype):
    fmt = NVFP4()
    for x in _inputs(dtype):
        xn = to_np(x)
        for amax in (None, torch.tensor(3.0), torch.tensor(1e4)):  # dynamic, saturating, loose
            vals, keep, s, g = R.ref_nvfp4(xn, None if amax is None else np.float32(amax))
            _check(fmt, x, amax, vals, keep)
            q = fmt.quantize(x, amax)
            assert_bitwise(q.scale.float(), torch.from_numpy(s), "nvfp4 block scales")
            assert_bitwise(q.global_scale, torch.tensor(np.float32(g)), "nvfp4 global scale")
    ties = _tie_tensor(R.E2M1, 16, dtype)  # global amax 6 * 448 -> g = 1, block amax 6 -> s = 1
    vals, keep, _, _ = R.ref_nvfp4(to_np(ties), np.float32(2688.0))
    _check(fmt, ties, torch.tensor(2688.0), vals, keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", ["ocp", "round_up"])
@pytest.mark.parametrize("cls,elem", [(MXFP8, "e4m3"), (MXFP4, "e2m1")])
def test_mx_matches_reference(cls, elem, rule, dtype):
    fmt = cls(scale_rule=rule)
    for x in _inputs(dtype):
        vals, keep, exps = R.ref_mx(to_np(x), elem, rule)
        _check(fmt, x, None, vals, keep)
        want = torch.from_numpy(
            np.where(np.isnan(exps), 255, np.nan_to_num(exps) + 127).astype(np.uint8))
        assert torch.equal(fmt.quantize(x).scale, want), "E8M0 scale codes"
    ties = _tie_tensor(R.E4M3 if elem == "e4m3" else R.E2M1, 32, dtype)  # both rules: scale 2^0
    _check(fmt, ties, None, *R.ref_mx(to_np(ties), elem, rule)[:2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int_matches_reference(dtype):
    for x in _inputs(dtype):
        xn = to_np(x)
        _check(INT8(), x, None, *R.ref_int(xn, None, 127, None))
        _check(INT8(), x, torch.tensor(20.0), *R.ref_int(xn, np.float32(20.0), 127, None))
        if x.dim() >= 2:
            _check(INT8(axis=-1), x, None, *R.ref_int(xn, None, 127, x.dim() - 1))
        _check(INT4(), x, None, *R.ref_int4(xn))
    ties = _tie_tensor(R.int_grid(127), 128, dtype)  # amax 127 -> scale 1: k + 0.5 ties
    _check(INT8(), ties, None, *R.ref_int(to_np(ties), None, 127, None))
    ties4 = _tie_tensor(R.int_grid(7), 128, dtype)
    _check(INT4(), ties4, None, *R.ref_int4(to_np(ties4)))


def test_exact_ties_round_to_even():
    """Midpoints between grid neighbours (scale exactly 1) go to the even code; above max
    saturates."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 5.9, 6.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 6.0, 6.0])
    block = torch.cat([ties, torch.full((21,), 6.0)])  # amax 6: NVFP4 s = 1 when g = 1; MX 2^0
    got = NVFP4().fake_quantize(block, torch.tensor(6.0 * 448))  # g = 1
    assert_bitwise(got[:11], want, "nvfp4 ties")
    assert_bitwise(MXFP4().fake_quantize(block)[:11], want, "mxfp4 ties")
    # OCP MX: amax 7.9 still gets 2^0 (floor(log2 7.9) - 2 = 0), so 7.9 saturates to 6
    sat = MXFP4().fake_quantize(torch.cat([torch.tensor([7.9, -7.0]), torch.zeros(30)]))
    assert_bitwise(sat[:2], torch.tensor([6.0, -6.0]), "mxfp4 saturation")
    # E4M3 ties around 1: grid 1, 1.125, 1.25 -> midpoints 1.0625 (-> 1), 1.1875 (-> 1.25)
    fp8 = FP8().fake_quantize(torch.tensor([1.0625, 1.1875, 440.0, 500.0, 448.0]),
                              torch.tensor(448.0))
    assert_bitwise(fp8, torch.tensor([1.0, 1.25, 448.0, 448.0, 448.0]), "e4m3 ties/saturation")
    i8 = INT8().fake_quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, 126.5, 130.0]),
                              torch.tensor(127.0))
    assert_bitwise(i8, torch.tensor([0.0, 2.0, 2.0, 0.0, 126.0, 127.0]), "int8 ties")


def test_mx_ties_scale_one():
    x = torch.tensor([448.0, 1.0625, 1.1875, 0.25 * 2**-9, 0.75 * 2**-9] + [0.0] * 27)
    got = MXFP8().fake_quantize(x)  # block amax 448: OCP exponent 8 - 8 = 0
    assert_bitwise(got[:5], torch.tensor([448.0, 1.0, 1.25, 0.0, 2**-9]),
                   "mxfp8 ties incl. subnormals")


def test_all_zero_and_extreme_scales():
    z = torch.zeros(2, 70)
    for fmt in (FP8(), NVFP4(), MXFP8(), MXFP4(), INT8(), INT4()):
        assert_bitwise(fmt.fake_quantize(z), z, f"{fmt} all-zero")
    q = MXFP8().quantize(z)
    assert torch.all(q.scale == 0), "all-zero MX block -> E8M0 code 0 (2^-127)"
    assert torch.all(NVFP4().quantize(z).scale.float() == 1.0)
    # float32-subnormal data: E8M0 exponent clamps at -127, values still match the reference
    tiny = torch.tensor([1e-40, -3e-39, 2e-45] + [0.0] * 29)
    for cls, elem in ((MXFP8, "e4m3"), (MXFP4, "e2m1")):
        vals, _, exps = R.ref_mx(to_np(tiny), elem)
        assert exps[0] == -127
        assert_bitwise(cls().fake_quantize(tiny), torch.from_numpy(vals), f"{cls.__name__} tiny")
    huge = torch.tensor([3e38, -1e38] + [1.0] * 30)
    for cls, elem in ((MXFP8, "e4m3"), (MXFP4, "e2m1")):
        for rule in ("ocp", "round_up"):
            vals, _, _ = R.ref_mx(to_np(huge), elem, rule)
            assert_bitwise(cls(scale_rule=rule).fake_quantize(huge), torch.from_numpy(vals), "huge")


def test_nonfinite_never_becomes_finite():
    x = random_tensor((4, 128))
    x[0, 3], x[1, 17], x[2, 100] = float("nan"), float("inf"), -float("inf")
    static = {FP8: torch.tensor(100.0), NVFP4: torch.tensor(100.0), INT8: torch.tensor(100.0)}
    for cls in (FP8, NVFP4, MXFP8, MXFP4, INT8, INT4):
        fmt = cls()
        for amax in (None, static.get(cls)):
            for out in (fmt.fake_quantize(x, amax), fmt.dequantize(fmt.quantize(x, amax))):
                assert (torch.isnan(out[0, 3]) and torch.isnan(out[1, 17])
                        and torch.isnan(out[2, 100])), cls
    assert torch.isnan(FP8().compute_amax(x)) or torch.isinf(FP8().compute_amax(x))
    assert (torch.isnan(INT8(axis=0).compute_amax(x)[0, 0])
            and torch.isinf(INT8(axis=0).compute_amax(x)[1, 0]))
    # static per-element NaN handling leaves other elements finite for FP8/INT8
    assert torch.isfinite(FP8().fake_quantize(x, torch.tensor(100.0))[3]).all()
    assert torch.isfinite(INT8().fake_quantize(x, torch.tensor(100.0))[3]).all()


def test_compute_amax_shapes():
    x = random_tensor((3, 5, 7))
    assert FP8().compute_amax(x).shape == ()
    assert FP8(axis=1).compute_amax(x).shape == (1, 5, 1)
    assert INT8(axis=0).compute_amax(x).shape == (3, 1, 1)
    assert NVFP4().compute_amax(x).dtype == torch.float32
    assert torch.equal(FP8(axis=-1).compute_amax(x), x.abs().amax(dim=(0, 1), keepdim=True))
