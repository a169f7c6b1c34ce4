"""TensorQuantizer: modes, calibration statistics, state dict and errors, against direct calls."""

import pytest
import torch

from megaquant.formats import get_format
from megaquant.quantizer import TensorQuantizer, disable_quantizers, enable_quantizers


def _x(seed=0, shape=(8, 64), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def test_quantizer_off_is_identity():
    x = _x()
    assert TensorQuantizer()(x) is x


def test_quantizer_static_matches_format_with_calibrated_amax():
    fmt = get_format("fp8")
    q = TensorQuantizer(fmt, mode="calibrate")
    batches = [_x(i, scale=1.0 + i) for i in range(3)]
    for b in batches:
        assert torch.equal(q(b), b)  # calibration passes data through unchanged
    q.finish_calibration()
    ref_amax = torch.stack([b.abs().max() for b in batches]).max()  # independent max
    assert q.mode == "static" and torch.equal(q.amax, ref_amax)
    x = _x(7)
    assert torch.equal(q(x), fmt.fake_quantize(x, ref_amax))


def test_quantizer_per_channel_amax_is_elementwise_running_max():
    fmt = get_format("int8", axis=0)
    q = TensorQuantizer(fmt, mode="calibrate")
    a, b = _x(1), _x(2)
    q(a), q(b)
    q.finish_calibration()
    ref = torch.maximum(a.abs().amax(dim=1, keepdim=True), b.abs().amax(dim=1, keepdim=True))
    assert torch.equal(q.amax.reshape(-1), ref.reshape(-1))


def test_quantizer_dynamic_uses_each_inputs_amax():
    fmt = get_format("nvfp4")
    q = TensorQuantizer(fmt, mode="dynamic")
    x = _x(3)
    assert torch.equal(q(x), fmt.fake_quantize(x, x.abs().max()))


def test_quantizer_static_without_amax_raises_with_remedy():
    q = TensorQuantizer(get_format("fp8"), mode="static")
    with pytest.raises(RuntimeError, match="calibrate the model first"):
        q(_x())


def test_quantizer_records_nonfinite_batch_instead_of_raising():
    q = TensorQuantizer(get_format("fp8"), mode="calibrate")
    q(_x(0))
    bad = _x(1)
    bad[0, 0] = float("nan")
    q(bad)
    q(_x(2))
    assert q.first_nonfinite_batch == 2


def test_quantizer_state_dict_round_trip_adopts_amax_shape():
    src = TensorQuantizer(get_format("fp8", axis=0), mode="calibrate")
    src(_x())
    src.finish_calibration()
    dst = TensorQuantizer(get_format("fp8", axis=0), mode="static")
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.amax, src.amax)
    x = _x(5)
    assert torch.equal(dst(x), src(x))


def test_quantizer_loads_state_without_amax():
    q = TensorQuantizer(get_format("fp8"), mode="dynamic")
    q.load_state_dict({}, strict=True)  # a parent layer's state dict has no quantizer state
    assert not q.has_amax


def test_quantizer_modes_are_validated():
    with pytest.raises(ValueError, match="valid modes"):
        TensorQuantizer(get_format("fp8"), mode="on")
    with pytest.raises(ValueError, match="needs a format"):
        TensorQuantizer(None, mode="static")


def test_quantizer_repr_names_format_mode_and_amax():
    q = TensorQuantizer(get_format("fp8"), mode="static")
    q.load_amax(torch.tensor(2.5))
    text = repr(q)
    assert "static" in text and "2.5" in text and "fp8" in text.lower()


def test_disable_enable_quantizers_restores_modes():
    model = torch.nn.ModuleDict({"a": TensorQuantizer(get_format("fp8"), mode="dynamic"),
                                 "b": TensorQuantizer()})
    saved = disable_quantizers(model)
    assert model["a"].mode == "off"
    enable_quantizers(model, saved)
    assert model["a"].mode == "dynamic" and model["b"].mode == "off"


def test_quantizer_nonfinite_check_names_weight_or_activation():
    from megaquant.calib.sync import SyncItem, check_finite

    fmt = get_format("fp8")
    w, a = TensorQuantizer(fmt, mode="calibrate"), TensorQuantizer(fmt, mode="calibrate")
    bad = _x(0)
    bad[0, 0] = float("inf")
    w(bad)
    for i in range(3):
        a(bad if i == 2 else _x(i))
    items = [SyncItem("l.weight_quantizer", w, None, role="weight"),
             SyncItem("l.input_quantizer", a, None, role="input")]
    with pytest.raises(FloatingPointError, match=r"non-finite weights \(NaN/inf\): "
                       r"l\.weight_quantizer; non-finite activations .* l\.input_quantizer at "
                       r"calibration batch 3"):
        check_finite(items, None)
    check_finite([SyncItem("ok", TensorQuantizer(fmt, mode="calibrate"), None)], None)
