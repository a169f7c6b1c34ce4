"""Registry and config validation: unknown names/options and bad values raise ValueError naming
the valid choices; formats are frozen, hashable dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaquant.formats import FORMATS, FP8, INT4, INT8, MXFP4, MXFP8, NVFP4, QuantFormat, get_format


def test_registry_names_and_classes():
    assert FORMATS == {"fp8": FP8, "nvfp4": NVFP4, "mxfp8": MXFP8, "mxfp4": MXFP4, "int8": INT8,
                       "int4": INT4}
    for name, cls in FORMATS.items():
        fmt = get_format(name)
        assert isinstance(fmt, cls) and isinstance(fmt, QuantFormat) and fmt.name == name
        hash(fmt)  # frozen dataclasses: usable as dict keys / in configs
        with pytest.raises(dataclasses.FrozenInstanceError):
            fmt.__setattr__(dataclasses.fields(fmt)[0].name, None)
    assert {n for n, c in FORMATS.items() if c.needs_amax} == {"fp8", "nvfp4", "int8"}


def test_get_format_options():
    assert get_format("fp8", dtype="e5m2", axis=0) == FP8("e5m2", 0)
    assert get_format("mxfp4", block_size=16, scale_rule="round_up") == MXFP4(16, "round_up")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="nvfp4.*") as err:
        get_format("fp4")
    assert all(n in str(err.value) for n in FORMATS)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_unknown_option_names_valid_fields(name):
    with pytest.raises(ValueError) as err:
        get_format(name, blocksize=16)
    for f in dataclasses.fields(FORMATS[name]):
        assert f.name in str(err.value)


@pytest.mark.parametrize(
    "name,opts,mentions",
    [
        ("fp8", {"dtype": "e3m4"}, ["e4m3", "e5m2"]),
        ("fp8", {"axis": "rows"}, ["axis"]),
        ("int8", {"axis": 1.5}, ["axis"]),
        ("nvfp4", {"block_size": 0}, ["block_size", "positive"]),
        ("int4", {"block_size": -128}, ["block_size"]),
        ("mxfp8", {"block_size": 32.0}, ["block_size"]),
        ("mxfp8", {"scale_rule": "x"}, ["ocp", "round_up"]),
        ("mxfp4", {"scale_rule": "floor"}, ["ocp", "round_up"]),
    ],
)
def test_bad_values_name_valid_choices(name, opts, mentions):
    with pytest.raises(ValueError) as err:
        get_format(name, **opts)
    assert all(m in str(err.value) for m in mentions), str(err.value)


def test_user_mistakes_raise_with_remedy():
    x = torch.randn(4, 32)
    with pytest.raises(TypeError, match="no calibratable amax"):
        MXFP8().compute_amax(x)
    with pytest.raises(TypeError, match="without amax"):
        INT4().fake_quantize(x, torch.tensor(1.0))
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        FP8().fake_quantize(x.double())
    with pytest.raises(ValueError, match="compute_amax"):
        FP8(axis=0).fake_quantize(x, torch.ones(3, 1))
    with pytest.raises(ValueError, match="out of range"):
        INT8(axis=2).fake_quantize(x)


def test_static_amax_accepts_flat_per_channel():
    x = torch.randn(4, 32)
    fmt = INT8(axis=0)
    amax = fmt.compute_amax(x)
    assert torch.equal(fmt.fake_quantize(x, amax.flatten()), fmt.fake_quantize(x, amax))
