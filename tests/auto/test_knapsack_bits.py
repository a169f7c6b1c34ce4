"""The pure pieces of the search: bit counts against the stated formulas, the knapsack against
brute force over every assignment."""

import itertools
import random

import pytest

from megaquant.auto.bits import weight_bits
from megaquant.auto.knapsack import solve
from megaquant.formats import get_format


@pytest.mark.parametrize("fmt, per_weight", [
    (None, 16.0),
    (get_format("nvfp4"), 4 + 8 / 16 + 32 / (64 * 128)),
    (get_format("mxfp4"), 4 + 8 / 32),
    (get_format("mxfp8"), 8 + 8 / 32),
    (get_format("fp8"), 8 + 32 / (64 * 128)),
    (get_format("fp8", axis=0), 8 + 32 * 64 / (64 * 128)),
    (get_format("int4"), 4 + 16 / 128),
])
def test_bits_per_weight_match_the_formula(fmt, per_weight):
    assert weight_bits(fmt, 64, 128) / (64 * 128) == pytest.approx(per_weight, rel=1e-12)


def _brute(costs, scores, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(costs[g][c] for g, c in enumerate(pick)) <= budget:
            s = sum(scores[g][c] for g, c in enumerate(pick))
            best = s if best is None or s < best else best
    return best


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_fits_and_is_near_brute_force(seed):
    rng = random.Random(seed)
    groups = 7
    sizes = [rng.choice([1, 2, 4, 8]) * 1000 for _ in range(groups)]
    per_bit = [4.5, 8.0, 16.0]
    costs = [[s * b for b in per_bit] for s in sizes]
    scores = [sorted((rng.random() * s for _ in per_bit), reverse=True) for s in sizes]
    for eff in (4.6, 6.0, 9.0, 15.9):
        budget = eff * sum(sizes)
        pick = solve(costs, scores, budget, resolution=256)
        assert sum(costs[g][c] for g, c in enumerate(pick)) <= budget
        got = sum(scores[g][c] for g, c in enumerate(pick))
        # Optimal over assignments whose grid-rounded cost fits: at worst as good as the true
        # optimum under a budget shrunk by one grid unit per group.
        unit = sum(max(c) - min(c) for c in costs) / (256 * groups)
        assert got <= _brute(costs, scores, budget - groups * unit) + 1e-9
        assert got >= _brute(costs, scores, budget) - 1e-9


def test_knapsack_below_the_cheapest_is_refused():
    with pytest.raises(ValueError, match="below the cheapest assignment"):
        solve([[4.0, 8.0]], [[1.0, 0.0]], 3.0)
