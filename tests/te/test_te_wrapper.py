"""End to end on CPU: each TE release's calling protocol, driven through the quantizing wrapper.

For every release in the fixture and both paths (``apply`` with grad, ``forward(None, ...)``
under no_grad), a TE-shaped double (tests/te/te_doubles.py) is called through
``megaquant.te.quantizing``. The checks, each against an independent reference:

* the operands the *call site* passes as ``weight_tensor`` / ``inp`` (read from TE's source, not
  from the signature the wrapper uses) arrive quantized, by the right quantizer;
* every other argument arrives as the very same object (``is``), the ctx placeholder included;
* the output equals the GEMM of the quantized operands computed directly with torch (exact: the
  same float32 ops on the same values, tolerance 1e-6);
* the module attribute is the original again afterwards.
"""

from __future__ import annotations

import functools

import pytest
import torch
from te_doubles import RELEASES, FakeTELayer, grouped_values, make_namespace

from megaquant.te import GROUPED_LINEAR, LAYERNORM_LINEAR, LINEAR, TESignatureError, patched
from megaquant.te.live import resolve_live
from megaquant.te.wrapper import quantizing

VERSIONS = list(RELEASES)
PATHS = ["apply", "forward"]


class StepQuantizer(torch.nn.Module):
    """Round to a grid of ``1/steps`` with a straight-through gradient; records its inputs."""

    def __init__(self, steps: float = 4.0):
        super().__init__()
        self.steps, self.seen = steps, []

    def forward(self, x):
        assert isinstance(x, torch.Tensor), f"quantizer got a non-tensor: {x!r}"
        self.seen.append(x)
        return x + (torch.round(x * self.steps) / self.steps - x).detach()


def reference_q(x: torch.Tensor, steps: float) -> torch.Tensor:
    return torch.round(x * steps) / steps


def _grad_mode(path: str):
    return torch.enable_grad() if path == "apply" else torch.no_grad()


def _check_passthrough(layer, received, mode, operand_exprs):
    """Every argument not named in ``operand_exprs`` is the identical object the site passes."""
    site = next(s for s in layer.entry["call_sites"] if s["mode"] == mode)
    expected = layer.built_args(mode)  # what the site passes without any patch
    # The double sees ctx separately; on the forward path the site's first argument is it.
    args = ([received["ctx"]] + received["args"]) if mode == "forward" else received["args"]
    assert len(args) == len(expected)
    flat_exprs = _flat_exprs(site["args"], layer)
    for expr, got, want in zip(flat_exprs, args, expected, strict=True):
        if expr in operand_exprs:
            assert got is not want, f"{expr} was not quantized"
        else:
            assert got is want, f"{expr} changed: {got!r} vs {want!r}"


def _flat_exprs(exprs, layer):
    out = []
    for e in exprs:
        n = len(layer.values.get(e, [None])) if e.startswith("*") else 1
        out += [e if n == 1 else f"{e}[{i}]" for i in range(n)]
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("version", VERSIONS)
def test_linear_wrapper_quantizes_weight_and_input_only(version, path):
    torch.manual_seed(0)
    ns = make_namespace(version, "_Linear")
    original = ns._Linear
    w, x = torch.randn(6, 8), torch.randn(5, 8)
    layer = FakeTELayer(version, "_Linear", ns, {"weight_tensor": w})
    qx, qw = StepQuantizer(4.0), StepQuantizer(2.0)
    positions = resolve_live(LINEAR, ns, version)
    with _grad_mode(path), quantizing(ns, positions, {"inp": qx, "weight": qw}):
        out = layer(x)
    assert ns._Linear is original
    ref = reference_q(x, 4.0) @ reference_q(w, 2.0).t()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert qx.seen[0] is x and qw.seen[0] is w
    (call,) = original.calls
    assert (call["ctx"] is None) == (path == "forward")
    _check_passthrough(layer, call, path, {"weight_tensor", "inp"})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("version", VERSIONS)
def test_layernorm_linear_wrapper_quantizes_weight_and_keeps_prenorm_input(version, path):
    torch.manual_seed(1)
    ns = make_namespace(version, "_LayerNormLinear")
    w, x = torch.randn(6, 8), torch.randn(5, 8)
    g, b = torch.rand(8) + 0.5, torch.randn(8)
    values = {"weight_tensor": w, "self.layer_norm_weight": g, "self.layer_norm_bias": b}
    layer = FakeTELayer(version, "_LayerNormLinear", ns, values)
    qw = StepQuantizer(2.0)
    positions = resolve_live(LAYERNORM_LINEAR, ns, version)
    with _grad_mode(path), quantizing(ns, positions, {"weight": qw}):
        out = layer(x)
    ref = torch.nn.functional.layer_norm(x, (8,), g, b) @ reference_q(w, 2.0).t()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    (call,) = ns._LayerNormLinear.calls
    _check_passthrough(layer, call, path, {"weight_tensor"})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("version", VERSIONS)
def test_grouped_wrapper_quantizes_each_expert_weight_with_its_quantizer(version, path):
    torch.manual_seed(2)
    num_gemms, m_splits = 3, [2, 0, 4]
    ns = make_namespace(version, "_GroupedLinear", num_gemms)
    weights = [torch.randn(5, 8) for _ in range(num_gemms)]
    x = torch.randn(sum(m_splits), 8)
    layer = FakeTELayer(version, "_GroupedLinear", ns, grouped_values(version, weights, m_splits))
    qx = StepQuantizer(4.0)
    qws = [StepQuantizer(s) for s in (1.0, 2.0, 8.0)]
    positions = resolve_live(GROUPED_LINEAR, ns, version)
    with _grad_mode(path), quantizing(ns, positions, {"inp": qx}, qws):
        out = layer(x)
    chunks = torch.split(reference_q(x, 4.0), m_splits)
    ref = torch.cat([c @ reference_q(w, s).t() for c, w, s in zip(chunks, weights, (1, 2, 8))])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert [q.seen[0] for q in qws] == weights and all(len(q.seen) == 1 for q in qws)
    (call,) = ns._GroupedLinear.calls
    operands = {"inp"} | {f"*weight_tensors[{i}]" for i in range(num_gemms)}
    _check_passthrough(layer, call, path, operands)


# One release per calling protocol: 1.x, 2.0-2.14, 2.15, 2.16-2.19, 2.20 (_linear_eager).
PROTOCOLS = ["1.13.0", "2.14.1", "2.15.0", "2.16.1", "2.20.2"]


@pytest.mark.parametrize("version", PROTOCOLS)
def test_linear_wrapper_gradients_are_straight_through(version):
    torch.manual_seed(3)
    ns = make_namespace(version, "_Linear")
    w = torch.randn(6, 8, requires_grad=True)
    x = torch.randn(5, 8, requires_grad=True)
    layer = FakeTELayer(version, "_Linear", ns, {"weight_tensor": w})
    positions = resolve_live(LINEAR, ns, version)
    with quantizing(ns, positions, {"inp": StepQuantizer(4.0), "weight": StepQuantizer(2.0)}):
        layer(x).square().sum().backward()
    # Reference: plain torch autograd with the same STE fake-quant.
    w2, x2 = w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref = StepQuantizer(4.0)(x2) @ StepQuantizer(2.0)(w2).t()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", PROTOCOLS)
def test_wrapper_introspects_original_under_an_active_partial_patch(version):
    """An outer patch (a partial-wrapped stand-in) is active: positions still come from the
    original, and the call goes through both (patches compose, none is dropped)."""
    ns = make_namespace(version, "_Linear")
    original = ns._Linear
    outer_calls = []

    def outer_apply(delegate, *args):
        outer_calls.append("apply")
        return delegate.apply(*args)

    def outer_forward(delegate, *args):
        outer_calls.append("forward")
        return delegate.forward(*args)

    outer = type("OuterPatch", (), {
        "apply": staticmethod(functools.partial(outer_apply, original)),
        "forward": staticmethod(functools.partial(outer_forward, original)),
    })
    w, x = torch.randn(4, 8), torch.randn(3, 8)
    layer = FakeTELayer(version, "_Linear", ns, {"weight_tensor": w})
    with patched(ns, "_Linear", outer):
        positions = resolve_live(LINEAR, ns, version)  # would fail on the partial's (*args)
        for grad in (True, False):
            with torch.set_grad_enabled(grad), quantizing(ns, positions,
                                                          {"weight": StepQuantizer(2.0)}):
                out = layer(x)
            torch.testing.assert_close(out, x @ reference_q(w, 2.0).t(), atol=1e-6, rtol=0)
            assert ns._Linear is outer
    assert ns._Linear is original and outer_calls == ["apply", "forward"]


def test_wrapper_restores_the_original_when_the_forward_raises():
    ns = make_namespace("2.20.2", "_Linear")
    original = ns._Linear
    layer = FakeTELayer("2.20.2", "_Linear", ns, {"weight_tensor": torch.randn(4, 8)})
    positions = resolve_live(LINEAR, ns, "2.20.2")
    with pytest.raises(RuntimeError):  # shape mismatch inside the "fused" function
        with quantizing(ns, positions, {"inp": StepQuantizer()}):
            layer(torch.randn(3, 7))
    assert ns._Linear is original


def test_wrapper_forwards_static_helpers_to_the_original():
    ns = make_namespace("2.20.2", "_GroupedLinear", 2)
    positions = resolve_live(GROUPED_LINEAR, ns, "2.20.2")
    with quantizing(ns, positions, {}) as wrapper:
        assert ns._GroupedLinear is wrapper
        assert ns._GroupedLinear._static_helper() == "helper"


def test_wrapper_reports_a_call_too_short_for_its_signature():
    ns = make_namespace("2.20.2", "_Linear")
    positions = resolve_live(LINEAR, ns, "2.20.2")
    with quantizing(ns, positions, {"inp": StepQuantizer()}):
        with pytest.raises(TESignatureError, match=r"TE 2\.20\.2: _Linear\.apply.*'inp'"):
            ns._Linear.apply(torch.randn(2, 2))


def test_resolve_live_names_version_function_missing_and_found():
    ns = make_namespace("2.20.2", "_Linear")
    with pytest.raises(TESignatureError) as err:
        resolve_live(GROUPED_LINEAR.__class__(
            function="_Linear", module=ns.__name__, layer="Linear", operands=("inp", "input_"),
        ), ns, "9.9.9")
    msg = str(err.value)
    for part in ("TE 9.9.9", "_Linear.forward", "'input_'", "'ctx', 'weight', 'inp', 'bias'"):
        assert part in msg, msg
