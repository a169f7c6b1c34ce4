"""The compiled fast path (megaquant.formats.fused) is bit-identical to the eager kernels, and the
dispatch policy / fallback behave as documented.

Compiling costs ~10-30 s per kernel variant on the 2-core CI machine, so by default only a few
variants are compiled (NVFP4 forward in float32 on a ragged last dim, NVFP4 STE with a dynamic
amax in bfloat16, MXFP4 STE in float16, FP8 forward+STE in bfloat16), on data full of ties,
saturation, zero blocks, subnormal scales and NaN/inf, plus NVFP4 over many shapes (one compile
per variant, not per shape). Set MEGAQUANT_TEST_COMPILED=all to compile every format x dtype x
grad variant (several minutes). The benchmark also checks compiled == eager for every format on
a [4096, 4096] tensor.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from megaquant.formats import FORMATS, FP8, MXFP4, NVFP4, fused, get_format
from tests.formats.fmt_helpers import assert_bitwise, eager_by_default, random_tensor  # noqa: F401

FULL = os.environ.get("MEGAQUANT_TEST_COMPILED") == "all"


def _hard_tensor(shape, dtype) -> torch.Tensor:
    """Ties (x.5 steps and E2M1/E4M3 midpoints), saturation, zero and tiny blocks, NaN/inf."""
    x = random_tensor(shape, torch.float32, lo=-8, hi=3)
    flat = x.view(-1)
    n = flat.numel()
    flat[: n // 8] = torch.tensor([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 1.0625, 6.0]).repeat(
        n // 64 + 1)[: n // 8]
    flat[n // 8 : n // 8 + 64] = 0.0
    flat[n // 4 : n // 4 + 32] *= 1e-30
    flat[n // 2] = 1e6  # saturates under a static amax
    flat[n // 2 + 100], flat[n // 2 + 200], flat[-1] = float("nan"), float("inf"), -float("inf")
    return x.to(dtype)


def _compare(fmt, x, amax, grad: bool, monkeypatch):
    outs = []
    for mode in ("eager", "compiled"):
        monkeypatch.setenv("MEGAQUANT_KERNEL", mode)
        xi = x.clone().requires_grad_(grad)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would make this test moot
            out = fmt.fake_quantize(xi, amax)
        if grad:
            out.backward(torch.ones_like(out))
        outs.append((out.detach(), xi.grad))
    assert_bitwise(outs[1][0], outs[0][0], f"{fmt} compiled vs eager")
    if grad:
        assert_bitwise(outs[1][1], outs[0][1], f"{fmt} compiled vs eager gradient")


@pytest.mark.timeout(300)
def test_compiled_nvfp4_bit_identical(monkeypatch):
    # last dim 250: not a multiple of 16, so the compiled padding path is exercised too
    x = _hard_tensor((64, 250), torch.float32)
    _compare(NVFP4(), x, torch.tensor(20.0), grad=False, monkeypatch=monkeypatch)


@pytest.mark.timeout(300)
def test_compiled_nvfp4_ste_dynamic_bf16_bit_identical(monkeypatch):
    # dynamic amax: the global scale comes from the block amaxes inside the compiled kernel
    x = _hard_tensor((3, 40, 96), torch.bfloat16)
    _compare(NVFP4(), x, None, grad=True, monkeypatch=monkeypatch)


@pytest.mark.timeout(300)
def test_compiled_mxfp4_ste_fp16_bit_identical(monkeypatch):
    x = _hard_tensor((5, 7, 100), torch.float16)  # ragged: 100 is not a multiple of 32
    _compare(MXFP4(), x, None, grad=True, monkeypatch=monkeypatch)


@pytest.mark.timeout(300)
def test_compiled_fp8_ste_bf16_bit_identical(monkeypatch):
    x = _hard_tensor((48, 128), torch.bfloat16)
    _compare(FP8(), x, torch.tensor(3.0), grad=True, monkeypatch=monkeypatch)


@pytest.mark.skipif(not FULL, reason="set MEGAQUANT_TEST_COMPILED=all (compiles every variant)")
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_compiled_all_formats_bit_identical(name, dtype, monkeypatch):
    fmt = get_format(name)
    for shape in ((64, 256), (3, 7, 100)):
        x = _hard_tensor(shape, dtype)
        amax = torch.tensor(20.0) if fmt.needs_amax else None
        for grad in (False, True):
            _compare(fmt, x, amax, grad, monkeypatch)


@pytest.fixture
def fresh_fused():
    fused.reset()
    yield
    fused.reset()


# QAT sees weights and activations of many shapes: 2-D and 3-D, ragged last dims, size-1 dims
MANY_SHAPES = [(64, 256), (128, 512), (3, 7, 128), (2, 1, 96), (5, 250), (4, 4, 4, 32), (256,),
               (7, 33), (16, 1, 48), (9, 160), (2, 3, 4, 5, 16), (300, 64)]


@pytest.mark.timeout(600)
def test_compiled_nvfp4_many_shapes_compile_once_per_variant(monkeypatch, fresh_fused):
    torch._dynamo.reset()  # count this test's compiles only
    graphs = counters["stats"]["unique_graphs"]
    fmt, amax = NVFP4(), torch.tensor(3.0)
    for shape in MANY_SHAPES:
        x = _hard_tensor(shape, torch.float32) if math.prod(shape) >= 512 else random_tensor(shape)
        for grad in (False, True):
            _compare(fmt, x, amax, grad, monkeypatch)  # fails on a fallback to eager, too
    # two variants (forward, STE); flat [rows, 16] views leave only the row count to vary
    assert counters["stats"]["unique_graphs"] - graphs <= 2


def test_compile_failure_warns_once_and_falls_back(monkeypatch, fresh_fused):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler (simulated)")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setenv("MEGAQUANT_KERNEL", "compiled")
    x = torch.randn(8, 64)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = NVFP4().fake_quantize(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = NVFP4().fake_quantize(x)  # second call: no second warning
    monkeypatch.setenv("MEGAQUANT_KERNEL", "eager")
    assert_bitwise(out, NVFP4().fake_quantize(x))
    assert_bitwise(again, out)


def test_auto_policy_uses_size_threshold(monkeypatch, fresh_fused):
    compiled_calls = []

    def recording_compile(fn, **kwargs):
        assert kwargs.get("fullgraph") is True  # graph breaks would silently cost speed
        def run(*args):
            compiled_calls.append(args[0].numel())
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setenv("MEGAQUANT_KERNEL", "auto")
    monkeypatch.setenv("MEGAQUANT_COMPILE_MIN_NUMEL", "1000")
    FP8().fake_quantize(torch.randn(10, 10))
    FP8().fake_quantize(torch.randn(10, 100))
    assert compiled_calls == [1000]
    monkeypatch.setenv("MEGAQUANT_KERNEL", "eager")
    FP8().fake_quantize(torch.randn(10, 100))
    assert compiled_calls == [1000]
    monkeypatch.setenv("MEGAQUANT_KERNEL", "fast")
    with pytest.raises(ValueError, match="auto"):
        FP8().fake_quantize(torch.randn(4))
