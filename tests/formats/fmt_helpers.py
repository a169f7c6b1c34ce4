"""Shared helpers for the format tests: bit-exact comparison, test data, the eager fixture.

Import ``eager_by_default`` into a test module to make it autouse there (no conftest.py, so the
file names cannot collide with other test folders).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def eager_by_default(monkeypatch):
    """Unit tests run the eager reference kernels unless a test asks for the compiled path."""
    monkeypatch.setenv("MEGAQUANT_KERNEL", "eager")
    torch.manual_seed(0)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal bit patterns (sign of zero included); NaN must sit at the same places (any payload)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ ({int((nan_a ^ nan_e).sum())})"
    a, e = actual[~nan_a], expected[~nan_e]
    ibits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    bad = a.view(ibits) != e.view(ibits)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {a.numel()} differ, e.g. got {a[bad][:5].tolist()} "
        f"want {e[bad][:5].tolist()}"
    )


def random_tensor(shape, dtype=torch.float32, lo=-6.0, hi=4.0, gen_seed=0) -> torch.Tensor:
    """Random signs and log-uniform magnitudes 10^lo .. 10^hi, cast to dtype."""
    g = torch.Generator().manual_seed(gen_seed)
    mag = 10.0 ** (lo + (hi - lo) * torch.rand(shape, generator=g))
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (sign * mag).to(dtype)


def to_np(x: torch.Tensor) -> np.ndarray:
    return x.float().numpy().copy()


def ref_to_torch(values: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dtype)
