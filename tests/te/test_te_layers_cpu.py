"""The quantized TE layer mixins on CPU, on Megatron-TE-shaped parents built from the doubles.

``megaquant.nn.te_layers`` itself needs TE; its classes are ``Mixin + Megatron TE class``. Here
the same mixins sit on parents that behave like Megatron's TE classes (``forward`` returns
``(out, bias)`` and reaches a TE-shaped double of each release), so conversion in place, the
fused routes, the unfused LayerNorm route and the conversion-time error run end to end with real
``TensorQuantizer``s. References are computed directly with the format's ``fake_quantize``.
"""

from __future__ import annotations

import pytest
import torch
from te_doubles import FakeTELayer, grouped_values, make_namespace

from megaquant.formats import get_format
from megaquant.quantizer import TensorQuantizer
from megaquant.te import TESignatureError
from megaquant.te.layers import (
    QuantTEGroupedLinearMixin,
    QuantTELayerNormLinearMixin,
    QuantTELinearMixin,
)

FP8 = get_format("fp8")
PROTOCOLS = ["1.13.0", "2.14.1", "2.15.0", "2.16.1", "2.20.2"]
GROUPED_PROTOCOLS = ["1.9.0.post1", "2.9.0", "2.12.0", "2.17.1", "2.20.2"]


def dyn() -> TensorQuantizer:
    return TensorQuantizer(FP8, mode="dynamic")


class FakeMegatronTELinear(torch.nn.Module):
    """Like Megatron's ``TELinear``: ``forward(x) -> (out, None)`` through TE's ``_Linear``."""

    def __init__(self, version: str, weight: torch.Tensor):
        super().__init__()
        self.version, self.ns = version, make_namespace(version, "_Linear")
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        caller = FakeTELayer(self.version, "_Linear", self.ns, {"weight_tensor": self.weight})
        return caller(x), None


class QuantFakeTELinear(QuantTELinearMixin, FakeMegatronTELinear):
    pass


def _convert(module, quant_cls):
    """In-place conversion, as megaquant.convert does it (plus the test double's namespace)."""
    module.__class__ = quant_cls
    module.te_namespace, module.te_version = module.ns, module.version
    module._setup_quantizers()
    return module


@pytest.mark.parametrize("version", PROTOCOLS)
def test_converted_linear_matches_fake_quantized_reference(version):
    torch.manual_seed(0)
    w, x = torch.randn(16, 32), torch.randn(4, 32)
    layer = _convert(FakeMegatronTELinear(version, w.clone()), QuantFakeTELinear)
    with torch.no_grad():
        out_off, _ = layer(x)
    torch.testing.assert_close(out_off, x @ w.t(), atol=1e-5, rtol=0)  # all off: plain TE
    for role in ("input", "weight", "output"):
        setattr(layer, f"{role}_quantizer", dyn())
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, bias = layer(x)
        ref = FP8.fake_quantize(FP8.fake_quantize(x) @ FP8.fake_quantize(w).t())
        torch.testing.assert_close(out, ref, atol=0, rtol=0)  # same float ops, bit-exact
        assert bias is None
    assert layer.ns._Linear.__name__ == "_Linear"  # the patch is gone


def test_conversion_fails_early_when_te_lacks_a_name():
    layer = FakeMegatronTELinear("2.20.2", torch.randn(4, 8))
    fn = layer.ns._Linear.forward
    params = list(fn.__signature__.parameters.values())
    fn.__signature__ = fn.__signature__.replace(
        parameters=[p.replace(name="input_") if p.name == "inp" else p for p in params]
    )
    with pytest.raises(TESignatureError,
                       match=r"TE 2\.20\.2: _Linear\.forward has no parameter 'inp'.*'input_'"):
        _convert(layer, QuantFakeTELinear)


class FakeMegatronTELayerNormLinear(torch.nn.Module):
    """Like ``TELayerNormColumnParallelLinear`` at TP=1 (bias added by TE, not returned)."""

    def __init__(self, version, weight, normalization="LayerNorm", zero_centered_gamma=False):
        super().__init__()
        self.version, self.ns = version, make_namespace(version, "_LayerNormLinear")
        h = weight.shape[1]
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(torch.randn(weight.shape[0]))
        self.layer_norm_weight = torch.nn.Parameter(torch.rand(h) + 0.5)
        self.layer_norm_bias = torch.nn.Parameter(torch.randn(h))
        self.eps, self.normalization = 1e-5, normalization
        self.zero_centered_gamma, self.use_bias, self.te_return_bias = (zero_centered_gamma,
                                                                        True, False)
        self.tp_size, self.sequence_parallel, self._tp_group = 1, False, None

    def forward(self, x):
        values = {"weight_tensor": self.weight, "self.layer_norm_weight": self.layer_norm_weight,
                  "self.layer_norm_bias": self.layer_norm_bias}
        return FakeTELayer(self.version, "_LayerNormLinear", self.ns, values)(x) + self.bias, None


class QuantFakeTELayerNormLinear(QuantTELayerNormLinearMixin, FakeMegatronTELayerNormLinear):
    pass


def _norm_reference(layer, x):
    """Float64 LayerNorm / RMSNorm, written out from their definitions."""
    xd, g = x.double(), layer.layer_norm_weight.double() + (1 if layer.zero_centered_gamma else 0)
    if layer.normalization == "RMSNorm":
        return (xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + layer.eps) * g).float()
    mu, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    return ((xd - mu) / torch.sqrt(var + layer.eps) * g + layer.layer_norm_bias.double()).float()


@pytest.mark.parametrize("version", PROTOCOLS)
def test_layernorm_linear_fused_route_quantizes_weight_only(version):
    torch.manual_seed(1)
    w, x = torch.randn(16, 32), torch.randn(4, 32)
    layer = _convert(FakeMegatronTELayerNormLinear(version, w.clone()), QuantFakeTELayerNormLinear)
    layer.weight_quantizer = dyn()
    with torch.no_grad():
        out, _ = layer(x)
    ref = _norm_reference(layer, x) @ FP8.fake_quantize(w).t() + layer.bias
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    assert len(layer.ns._LayerNormLinear.calls) == 1  # it did go through TE's fused function


@pytest.mark.parametrize("norm,zc", [("LayerNorm", False), ("RMSNorm", False), ("RMSNorm", True)])
def test_layernorm_linear_unfused_route_quantizes_the_normalized_input(norm, zc):
    torch.manual_seed(2)
    w, x = torch.randn(16, 32), torch.randn(4, 32) * 3 + 1
    base = FakeMegatronTELayerNormLinear("2.20.2", w.clone(), norm, zc)
    layer = _convert(base, QuantFakeTELayerNormLinear)
    # All quantizers off, the unfused route must equal the norm + GEMM (fused double: LN only).
    with torch.no_grad():
        plain, _ = layer._unfused_forward(x)
    ref_plain = _norm_reference(layer, x) @ w.t() + layer.bias
    torch.testing.assert_close(plain, ref_plain, atol=1e-4, rtol=1e-5)
    layer.input_quantizer, layer.weight_quantizer = dyn(), dyn()
    out, bias = layer(x)
    ref = FP8.fake_quantize(_norm_reference(layer, x)) @ FP8.fake_quantize(w).t() + layer.bias
    # fp8 rounding of a norm computed in float32 vs float64 can flip a code at a tie: compare
    # with a tolerance of one fp8 step on a few elements rather than exactly.
    close = torch.isclose(out, ref, atol=1e-3, rtol=1e-4)
    assert close.float().mean() > 0.97, (out - ref).abs().max()
    assert bias is None and layer.ns._LayerNormLinear.calls == []  # fused function not used


class FakeMegatronTEGroupedLinear(torch.nn.Module):
    """Like ``TEColumnParallelGroupedLinear``: ``weight{i}`` per expert, ``forward(x,
    m_splits)``."""

    def __init__(self, version, weights):
        super().__init__()
        self.version, self.num_gemms = version, len(weights)
        self.ns = make_namespace(version, "_GroupedLinear", len(weights))
        for i, w in enumerate(weights):
            setattr(self, f"weight{i}", torch.nn.Parameter(w))

    def forward(self, x, m_splits):
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        values = grouped_values(self.version, weights, m_splits)
        return FakeTELayer(self.version, "_GroupedLinear", self.ns, values)(x), None


class QuantFakeTEGroupedLinear(QuantTEGroupedLinearMixin, FakeMegatronTEGroupedLinear):
    pass


@pytest.mark.parametrize("version", GROUPED_PROTOCOLS)
def test_grouped_linear_quantizes_each_expert_with_its_own_amax(version):
    torch.manual_seed(3)
    # Experts with very different ranges: a shared amax would flush the small one's values.
    weights = [torch.randn(8, 16) * s for s in (1e-3, 1.0, 50.0)]
    m_splits, x = [3, 1, 4], torch.randn(8, 16)
    layer = _convert(FakeMegatronTEGroupedLinear(version, [w.clone() for w in weights]),
                     QuantFakeTEGroupedLinear)
    assert len(layer.weight_quantizers) == 3
    assert [t.data_ptr() for t in layer.calib_tensors("weight")] == [
        getattr(layer, f"weight{i}").data_ptr() for i in range(3)]
    layer.input_quantizer = dyn()
    layer.weight_quantizers = torch.nn.ModuleList(dyn() for _ in range(3))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, _ = layer(x, m_splits)
        chunks = torch.split(FP8.fake_quantize(x), m_splits)
        ref = torch.cat([c @ FP8.fake_quantize(w).t() for c, w in zip(chunks, weights)])
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_quantized_layer_refuses_to_run_under_torch_compile(monkeypatch):
    layer = _convert(FakeMegatronTELinear("2.20.2", torch.randn(4, 8)), QuantFakeTELinear)
    layer.weight_quantizer = dyn()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(NotImplementedError, match="run eagerly"):
        layer(torch.randn(2, 8))
