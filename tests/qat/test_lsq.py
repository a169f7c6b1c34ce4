"""Learnable scales (megaquant.formats.lsq): forward bit-exact with the fixed-scale kernels,
gradients equal to a float64 finite-difference reference, and bad options refused.

Gradient reference: LSQ's gradient is the derivative of the *surrogate* in which each
rounding ``R(v)`` is replaced by ``v + (R(v0) - v0)``, the residual frozen at the current
point (the straight-through estimator). The test evaluates that surrogate in float64 with its
own formula (clamps, scales, products as docs/qat.md writes them) and differentiates it by
central differences; the library's float32 autograd gradient must match within 1e-3 relative
(float32 sums over ~2k terms; measured < 1e-5). Points within 1e-3 of a clamp edge are avoided
by construction: the data are drawn so that no |y| sits at a clamp limit.
"""

import pytest
import torch

from megaquant.formats import constants as C
from megaquant.formats import get_format
from megaquant.formats.lsq import check_learnable, initial_block_amax, learnable_fake_quantize

D64 = torch.float64


def _data(shape=(8, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2


CASES = [("nvfp4", {}, False), ("nvfp4", {}, True), ("int8", {}, False),
         ("int8", {"axis": 0}, False), ("fp8", {}, False), ("int4", {}, True)]


@pytest.mark.parametrize("name,opts,per_block", CASES)
def test_forward_bit_exact(name, opts, per_block):
    fmt = get_format(name, **opts)
    x = _data()
    amax = fmt.compute_amax(x) * 0.8 if fmt.needs_amax else None  # some clipping
    blocks = initial_block_amax(fmt, x) if per_block else None
    ref = fmt.fake_quantize(x, amax) if amax is not None else fmt.fake_quantize(x)
    got = learnable_fake_quantize(fmt, x, amax, blocks)
    assert torch.equal(got, ref)


def _surrogate(name, x, a, blocks, frozen):
    """float64 STE surrogate of the fake-quantized x (see the module docstring)."""
    if name == "int8":
        s = a / 127
        return (torch.clamp(x / s, -127, 127) + frozen["r"]) * s
    xb = x.reshape(x.shape[0], -1, 16 if name == "nvfp4" else 128)
    bamax = blocks.unsqueeze(-1)
    if name == "int4":
        s = bamax / 7
        return ((torch.clamp(xb / s, -7, 7) + frozen["r"]) * s).reshape(x.shape)
    g = a / (6 * 448)
    s = torch.clamp(bamax / (6 * g), C.NVFP4_SCALE_MIN, 448) + frozen["e"]
    return ((torch.clamp(xb / (s * g), -6, 6) + frozen["r"]) * s * g).reshape(x.shape)


def _frozen(name, x, a, blocks):
    """The rounding residuals at the current point, from the library's own float32 values."""
    fmt = get_format(name)
    x32 = x.float()
    if name == "int8":
        s = a / 127
        out = fmt.fake_quantize(x32, a.float()).double()
        return {"r": out / s - torch.clamp(x / s, -127, 127)}
    xb = x.reshape(x.shape[0], -1, 16 if name == "nvfp4" else 128)
    bamax = blocks.unsqueeze(-1)
    if name == "int4":
        s = bamax / 7
        y = torch.clamp(xb / s, -7, 7)
        return {"r": torch.round(xb / s).clamp(-7, 7) - y}
    from megaquant.formats.nvfp4 import nvfp4_block_scale, nvfp4_global_scale

    g32 = nvfp4_global_scale(a.float())
    s32 = nvfp4_block_scale(bamax.float(), g32).double()
    g = a / (6 * 448)
    e = s32 - torch.clamp(bamax / (6 * g), C.NVFP4_SCALE_MIN, 448)
    q = learnable_fake_quantize(fmt, x32, a.float(), blocks.float()).double()
    y = torch.clamp(xb / (s32 * g), -6, 6)
    return {"e": e, "r": q.reshape(xb.shape) / (s32 * g) - y}


def _fd(f, t, h):
    grad = torch.zeros_like(t)
    flat = grad.view(-1)
    for i in range(t.numel()):
        d = torch.zeros_like(t).view(-1)
        d[i] = h
        flat[i] = (f(t + d.view_as(t)) - f(t - d.view_as(t))) / (2 * h)
    return grad


@pytest.mark.parametrize("name", ["int8", "int4", "nvfp4"])
def test_scale_gradients_match_float64_finite_differences(name):
    fmt = get_format(name)
    x = _data((4, 256), seed=1).double()
    w = _data((4, 256), seed=2).double()  # the loss is sum(w * out)
    a = x.abs().amax() * (0.9 if name == "int8" else 0.5 if name == "nvfp4" else 1.0)
    blocks = initial_block_amax(fmt, x).double() * 0.9 if fmt.name != "int8" else None
    frozen = _frozen(name, x, a, blocks)

    # library, float32 autograd
    a32 = a.float().clone().requires_grad_(fmt.needs_amax)
    b32 = None if blocks is None else blocks.float().clone().requires_grad_(True)
    x32 = x.float().clone().requires_grad_(True)
    out = learnable_fake_quantize(fmt, x32, a32 if fmt.needs_amax else None, b32)
    (out.double() * w).sum().backward()

    loss = lambda aa, bb: (w * _surrogate(name, x, aa, bb, frozen)).sum()  # noqa: E731
    assert torch.allclose(out.double(), _surrogate(name, x, a, blocks, frozen), rtol=1e-6,
                          atol=1e-6)
    if fmt.needs_amax:
        ref = _fd(lambda t: loss(t, blocks), a, float(a) * 1e-6)
        assert a32.grad.double() == pytest.approx(float(ref), rel=1e-3, abs=1e-4)
        if name == "nvfp4":
            assert a32.grad.abs() > 0  # amax small enough that some block scales saturate
    if blocks is not None:
        ref = _fd(lambda t: loss(a, t), blocks, 1e-7)
        assert torch.allclose(b32.grad.double(), ref, rtol=1e-3, atol=1e-4)
        assert ref.abs().sum() > 0
    # x: the plain STE (1 inside the range, 0 where clipped)
    ref_x = torch.autograd.functional.jacobian(lambda t: (w * _surrogate(name, t, a, blocks,
                                                          frozen)).sum(), x)
    assert torch.allclose(x32.grad.double(), ref_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,per_block,match", [
    ("mxfp4", False, r"mxfp4.*powers of two.*nvfp4"),
    ("mxfp8", True, r"mxfp8.*powers of two"),
    ("int4", False, r"int4 has no per-tensor scale.*per_block: true"),
    ("int8", True, r"per_block needs a block-scaled format.*int8"),
])
def test_refused_formats_name_the_option(name, per_block, match):
    with pytest.raises(ValueError, match=match):
        check_learnable(get_format(name), per_block, "quantizer x")


def test_quantizer_parameter_keeps_key_and_float32():
    from megaquant.quantizer import TensorQuantizer

    fmt = get_format("nvfp4")
    x = _data()
    q = TensorQuantizer(fmt, "static")
    q.load_amax(fmt.compute_amax(x))
    ref = q(x)
    q.make_learnable(weight=x)
    assert isinstance(q.amax, torch.nn.Parameter) and set(q.state_dict()) == {"amax", "block_amax"}
    assert torch.equal(q(x), ref)
    q.bfloat16()
    assert q.amax.dtype == torch.float32 and q.block_amax.dtype == torch.float32
    fresh = TensorQuantizer(fmt, "static")
    with pytest.raises(ValueError, match="no amax to learn"):
        fresh.make_learnable()
    with pytest.raises(ValueError, match="static quantizer"):
        TensorQuantizer(fmt, "dynamic").make_learnable()


@pytest.mark.parametrize("name", ["nvfp4", "int4"])
def test_export_codes_of_learned_blocks_decode_to_the_forward(name):
    from megaquant.formats.lsq import quantize_learned

    fmt = get_format(name)
    x = _data()
    amax = fmt.compute_amax(x) if fmt.needs_amax else None
    g = torch.Generator().manual_seed(5)
    blocks = initial_block_amax(fmt, x) * (0.6 + 0.8 * torch.rand(8, 256 // fmt.block_size,
                                                                   generator=g))
    ran = learnable_fake_quantize(fmt, x, amax, blocks)
    fixed = fmt.fake_quantize(x, amax) if amax is not None else fmt.fake_quantize(x)
    assert not torch.equal(ran, fixed)  # the learned blocks matter
    assert torch.equal(fmt.dequantize(quantize_learned(fmt, x, amax, blocks)), ran)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name,per_block,dtype,shape", [
    ("nvfp4", False, torch.float32, (6, 256)), ("nvfp4", True, torch.float32, (6, 256)),
    ("nvfp4", False, torch.bfloat16, (3, 2, 40)), ("int4", True, torch.float32, (4, 300))])
def test_fused_path_equals_the_eager_autograd_chain(monkeypatch, mode, name, per_block, dtype,
                                                    shape):
    """The fused NVFP4/INT4 Function (eager kernels, or compiled ones) against the eager LSQ
    chain: the same values bit for bit, gradients equal up to float32 summation order."""
    from megaquant.formats import fused
    from megaquant.formats.lsq import learnable_fake_quantize_eager

    monkeypatch.setenv("MEGAQUANT_KERNEL", mode)
    fused.reset()
    fmt = get_format(name)
    x = _data(shape, seed=5).to(dtype)
    w = _data(shape, seed=6)
    amax = fmt.compute_amax(x) * 0.3 if fmt.needs_amax else None  # saturating block scales
    blocks = initial_block_amax(fmt, x) * 0.9 if per_block else None
    grads = []
    for fn in (learnable_fake_quantize, learnable_fake_quantize_eager):
        xs = x.clone().requires_grad_(True)
        a = None if amax is None else amax.clone().requires_grad_(True)
        b = None if blocks is None else blocks.clone().requires_grad_(True)
        out = fn(fmt, xs, a, b)
        (out.float() * w).sum().backward()
        grads.append((out, xs.grad, a if a is None else a.grad, b if b is None else b.grad))
    (out, gx, ga, gb), (ref, rx, ra, rb) = grads
    assert out.dtype == dtype and torch.equal(out, ref)
    assert torch.allclose(gx.float(), rx.float(), rtol=1e-2 if dtype != torch.float32 else 0,
                          atol=1e-6)
    if ga is not None:
        assert ra.abs() > 0 and ga == pytest.approx(float(ra), rel=1e-4)
    if gb is not None:
        assert torch.allclose(gb, rb, rtol=1e-4, atol=1e-6) and rb.abs().sum() > 0
