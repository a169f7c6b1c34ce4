"""Hadamard matrices: which orders we can build, how, and the rotations made from them.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and orthogonal rows: ``H H^T = n I``.
``H / sqrt(n)`` is then an orthogonal matrix whose every entry has the same magnitude, so it
spreads any one large coordinate (an activation outlier) evenly over all ``n`` coordinates:
exactly what a quantizer with one scale per tensor or per block wants (QuaRot, SpinQuant,
MR-GPTQ). Orders built here, all in float64 and exactly (±1 entries):

* **Sylvester**: ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``: every power of two.
* **Paley I** (prime ``p = 3 mod 4``): order ``p + 1`` (4, 8, 12, 20, 24, 32, 44, 48, ...),
  from the Jacobsthal matrix ``Q[i, j] = chi(j - i)`` (``chi``: the quadratic character mod p,
  skew-symmetric here): ``H = I + [[0, 1^T], [-1, Q]]``.
* **Paley II** (prime ``p = 1 mod 4``): order ``2 (p + 1)`` (12, 20, 28, 36, 60, ...), from the
  symmetric conference matrix ``C = [[0, 1^T], [1, Q]]``:
  ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``.
* **Kronecker products** ``H_m (x) H_{2^k}`` of a Paley order ``m`` and a Sylvester power: e.g.
  576 = 36 x 16 (SmolLM2's hidden size), 1536 = 12 x 128 (its MLP width), 4096 = 2^12.

An order none of these reach (any odd n > 1, 2 x odd > 2, or 92) is refused with the
orders that would fit. Where a full Hadamard is not wanted or not available, a *block-diagonal*
rotation uses ``H_b / sqrt(b)`` on consecutive blocks of ``b`` coordinates (``b`` must divide n);
it mixes only within blocks, which is what the online block transform of a quantized layer's
input needs (blocks matched to the format's scale blocks, never straddling a TP shard).

A *randomized* Hadamard ``H diag(signs) / sqrt(n)`` (random ±1 signs from a seeded generator;
QuaRot) is still orthogonal, and the same seed gives the same matrix on every rank.
"""

from __future__ import annotations

import functools

import torch

CONSTRUCTIONS = ("Sylvester 2^k", "Paley I p+1 (prime p = 3 mod 4)",
                 "Paley II 2(p+1) (prime p = 1 mod 4)", "Kronecker products of these with 2^k")


def _is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), float64 ±1."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) mod p: +1 for a nonzero square, -1 for a non-square, 0 on the
    diagonal."""
    squares = {(x * x) % p for x in range(1, p)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, p)],
                       dtype=torch.float64)
    idx = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    return chi[idx]


def paley(p: int) -> torch.Tensor:
    """The Paley Hadamard matrix from prime ``p``: order p+1 (p = 3 mod 4) or 2(p+1)
    (p = 1 mod 4)."""
    if not _is_prime(p) or p == 2:
        raise ValueError(f"Paley's constructions need an odd prime, got {p}")
    q = _jacobsthal(p)
    ones = torch.ones(p, 1, dtype=torch.float64)
    if p % 4 == 3:
        s = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.t()], 1),
                       torch.cat([-ones, q], 1)], 0)
        return torch.eye(p + 1, dtype=torch.float64) + s
    c = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.t()], 1),
                   torch.cat([ones, q], 1)], 0)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(p + 1, dtype=torch.float64), b)


def _paley_orders(limit: int) -> dict[int, int]:
    """order -> prime, for every Paley order up to ``limit``."""
    out = {}
    for p in range(3, limit):
        if _is_prime(p):
            order = p + 1 if p % 4 == 3 else 2 * (p + 1)
            if order <= limit:
                out.setdefault(order, p)
    return out


def construction(n: int) -> tuple[int, int] | None:
    """(Paley prime or 0 for none, power of two) with ``order(paley) * 2^k == n``, or None."""
    if _is_pow2(n):
        return 0, n
    for m, p in sorted(_paley_orders(n).items(), reverse=True):
        if n % m == 0 and _is_pow2(n // m):
            return p, n // m
    return None


def has_hadamard(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and construction(n) is not None


def _no_construction(n: int, what: str) -> ValueError:
    near = [m for m in range(max(1, n - 64), n + 65) if construction(m) is not None]
    below = max((m for m in near if m < n), default=None)
    above = min((m for m in near if m > n), default=None)
    blocks = [b for b in (16, 32, 64, 128, 256, 512) if n % b == 0]
    fits_none = "; no power-of-two block >= 16 divides it"
    return ValueError(
        f"no Hadamard matrix of order {n} ({what}) can be built here: the constructions are "
        f"{', '.join(CONSTRUCTIONS)}. Nearest orders that fit: {below} and {above}. Use a "
        "block-diagonal rotation instead (rotation option block: B with B dividing "
        f"{n}{'; blocks that fit: ' + str(blocks) if blocks else fits_none}).")


@functools.lru_cache(maxsize=32)
def _hadamard_cached(n: int) -> torch.Tensor:
    c = construction(n)
    if c is None:
        raise _no_construction(n, "size")
    p, k = c
    return sylvester(k) if p == 0 else torch.kron(paley(p), sylvester(k))


def hadamard(n: int, what: str = "size") -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64, ±1); ValueError naming what would fit."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard order must be a positive int, got {n!r}")
    if construction(n) is None:
        raise _no_construction(n, what)
    return _hadamard_cached(n).clone()


def block_hadamard(n: int, block: int) -> torch.Tensor:
    """Block-diagonal ``I_{n/b} (x) H_b / sqrt(b)`` (float64, orthogonal)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or n % block:
        raise ValueError(f"a block-diagonal rotation of size {n} needs a block that divides it, "
                         f"got block={block!r}")
    hb = hadamard(block, f"block of a size-{n} rotation") / block ** 0.5
    return torch.kron(torch.eye(n // block, dtype=torch.float64), hb)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """±1 (float64) from a seeded CPU generator: the same on every rank for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def rotation(n: int, *, block: int = 0, seed: int | None = 0) -> torch.Tensor:
    """An orthogonal ``n x n`` float64 rotation: ``diag(signs) H / sqrt(n)`` (``block`` 0) or its
    block-diagonal form with blocks of ``block``; ``seed`` None: no random signs."""
    h = hadamard(n, "size") / n ** 0.5 if block == 0 else block_hadamard(n, block)
    return h if seed is None else random_signs(n, seed)[:, None] * h


class BlockHadamard:
    """The online transform ``x -> x (I (x) H_b / sqrt(b))`` along the last dim.

    Blocks of ``b`` consecutive coordinates, each multiplied by the normalised Hadamard of order
    ``b`` (symmetric for Sylvester orders, so the transform is its own inverse). Costs one
    ``[*, b] x [b, b]`` GEMM, i.e. ``2 b`` flops per element (b = 16: 32 flops/element, about
    ``2 b / k`` of a ``k``-wide linear layer's GEMM). A fast Walsh-Hadamard kernel (log2 b
    butterfly stages) would cost ``b log2 b`` adds; the GEMM is simpler and fast enough here.
    """

    def __init__(self, block: int):
        if not _is_pow2(block) or block < 2:
            raise ValueError(f"the online block transform needs a power-of-two block >= 2 "
                             f"(Sylvester), got {block!r}")
        self.block = block
        self._mats: dict = {}

    def matrix(self, dtype: torch.dtype, device) -> torch.Tensor:
        key = (dtype, str(device))
        if key not in self._mats:
            self._mats[key] = (sylvester(self.block) / self.block ** 0.5).to(dtype=dtype,
                                                                              device=device)
        return self._mats[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        if k % self.block:
            raise ValueError(f"online block Hadamard of block {self.block} on an input of width "
                             f"{k}: the width must be a multiple of the block")
        xb = x.reshape(*x.shape[:-1], k // self.block, self.block)
        return (xb @ self.matrix(x.dtype, x.device)).reshape(x.shape)

    def __repr__(self) -> str:
        return f"BlockHadamard(block={self.block})"
