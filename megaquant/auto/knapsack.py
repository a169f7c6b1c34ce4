"""Multiple-choice knapsack: one choice per group, least summed score within a bits budget.

Exact dynamic programming over a grid of bit costs. Each choice's cost is rounded *up* to the
grid, so the answer always fits the real budget; it is optimal among assignments whose rounded
cost fits, and the rounding can waste at most one grid unit per group: with ``resolution`` units
per group (default 256) that is at most 1/256 of the budget's spread between the cheapest and
the dearest assignment. Ties break towards the earlier choice (the candidates' order), so the
result depends only on the numbers, never on the machine.
"""

from __future__ import annotations

import math

import numpy as np


def solve(costs: list[list[float]], scores: list[list[float]], budget: float,
          resolution: int = 256) -> list[int]:
    """Index of the chosen option for each group.

    ``costs[g][c]`` (bits) and ``scores[g][c]`` for group ``g``, choice ``c``; ``budget``: the
    most bits all groups may use together. Raises ValueError when even the cheapest choices
    do not fit.
    """
    floor = sum(min(c) for c in costs)
    if floor > budget * (1 + 1e-12):
        raise ValueError(f"budget {budget:.6g} bits is below the cheapest assignment "
                         f"({floor:.6g} bits)")
    spread = sum(max(c) - min(c) for c in costs)
    if spread == 0:
        return [int(np.argmin(s)) for s in scores]
    unit = spread / (resolution * len(costs))
    cap = int(math.floor((budget - floor) / unit + 1e-9))
    inf = float("inf")
    best = np.zeros(cap + 1)  # best[k]: least score with at most k extra units
    picks = []
    for cost, score in zip(costs, scores):
        extra = [int(math.ceil((c - min(cost)) / unit - 1e-9)) for c in cost]
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int64)
        for c, (e, s) in enumerate(zip(extra, score)):
            if e > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[e:] = best[: cap + 1 - e] + s
            better = cand < new
            new[better], pick[better] = cand[better], c
        best = new
        picks.append(pick)
    choice, k = [], cap
    for g in range(len(costs) - 1, -1, -1):
        c = int(picks[g][k])
        choice.append(c)
        k -= int(math.ceil((costs[g][c] - min(costs[g])) / unit - 1e-9))
    return choice[::-1]
