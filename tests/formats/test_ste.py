"""Straight-through gradient: upstream gradient where the input was not clipped, 0 where it was
(mask from the reference), and only a bool mask is saved for backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaquant.formats import FP8, INT4, INT8, MXFP4, MXFP8, NVFP4
from tests.formats import fmt_reference as R
from tests.formats.fmt_helpers import assert_bitwise, eager_by_default, random_tensor  # noqa: F401

FORMATS_AND_REFS = [
    (FP8(), torch.tensor(20.0), lambda x: R.ref_fp8(x, np.float32(20.0), "e4m3", None)[1]),
    (FP8("e5m2", axis=0), None, lambda x: R.ref_fp8(x, None, "e5m2", 0)[1]),
    (NVFP4(), torch.tensor(2.0), lambda x: R.ref_nvfp4(x, np.float32(2.0))[1]),
    (MXFP8(), None, lambda x: R.ref_mx(x, "e4m3")[1]),
    (MXFP4(), None, lambda x: R.ref_mx(x, "e2m1")[1]),
    (INT8(), torch.tensor(10.0), lambda x: R.ref_int(x, np.float32(10.0), 127, None)[1]),
    (INT4(), None, lambda x: R.ref_int4(x)[1]),
]


@pytest.mark.parametrize("fmt,amax,ref_keep", FORMATS_AND_REFS, ids=lambda v: str(v)[:20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ste_gradient_matches_reference_mask(fmt, amax, ref_keep, dtype):
    x = random_tensor((8, 70), dtype, lo=-3, hi=2).requires_grad_(True)
    keep = torch.from_numpy(ref_keep(x.detach().float().numpy()))
    up = torch.randn(x.shape).to(dtype)
    out = fmt.fake_quantize(x, amax)
    assert out.dtype == dtype and out.requires_grad
    out.backward(up)
    assert_bitwise(x.grad, torch.where(keep, up, torch.zeros((), dtype=dtype)), f"{fmt} grad")
    if fmt.needs_amax and amax is not None:
        assert 0 < int((~keep).sum()) < keep.numel(), "test data must clip some elements, not all"


@pytest.mark.parametrize("fmt", [FP8(), NVFP4(), MXFP4(), INT8(axis=0), INT4()], ids=str)
def test_ste_saves_only_a_bool_mask(fmt):
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(16, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fmt.fake_quantize(x)
    out.sum().backward()
    assert saved == [(torch.bool, x.numel())], saved


def test_no_graph_without_grad():
    x = torch.randn(4, 32)
    assert not NVFP4().fake_quantize(x).requires_grad
    with torch.no_grad():
        assert not NVFP4().fake_quantize(x.requires_grad_(True)).requires_grad
