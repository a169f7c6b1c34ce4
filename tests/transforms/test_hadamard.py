"""Hadamard constructions against their definition (float64: H H^T = n I exactly, entries ±1)."""

import pytest
import torch

from megaquant.transforms import hadamard as H


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 64, 576, 768, 1536])
def test_hadamard_rows_are_orthogonal(n):
    h = H.hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones(n, n))
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_paley_constructions_give_their_orders():
    assert H.paley(11).shape == (12, 12) and H.paley(5).shape == (12, 12)  # Paley I and II
    assert H.paley(17).shape == (36, 36) and H.paley(19).shape == (20, 20)
    for p in (5, 7, 13, 23):
        h = H.paley(p)
        assert torch.equal(h @ h.t(), h.shape[0] * torch.eye(h.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 14, 22, 92])
def test_sizes_without_a_construction_are_refused_naming_what_fits(n):
    with pytest.raises(ValueError, match=rf"order {n} .*Sylvester.*Paley.*Nearest orders.*block"):
        H.hadamard(n)


def test_block_and_random_rotations_are_orthogonal_and_seeded():
    q = H.rotation(96, block=32, seed=3)
    assert torch.allclose(q @ q.t(), torch.eye(96, dtype=torch.float64), atol=1e-12)
    assert torch.count_nonzero(q[:32, 32:]) == 0  # block-diagonal: no mixing across blocks
    r = H.rotation(576, seed=5)
    assert torch.allclose(r @ r.t(), torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r, H.rotation(576, seed=5)) and not torch.equal(r, H.rotation(576, seed=6))
    with pytest.raises(ValueError, match="divides"):
        H.block_hadamard(96, 40)


def test_block_hadamard_transform_equals_the_dense_block_matrix():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    t = H.BlockHadamard(16)
    assert torch.allclose(t(x), x @ H.block_hadamard(64, 16), atol=1e-12)
    assert torch.allclose(t(t(x)), x, atol=1e-12)  # symmetric and orthogonal: self-inverse
    with pytest.raises(ValueError, match="multiple of the block"):
        t(torch.randn(2, 40))
    with pytest.raises(ValueError, match="power-of-two"):
        H.BlockHadamard(12)
