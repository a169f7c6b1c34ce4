"""Learning-rate schedule: linear warm-up, then cosine (or linear) decay. A pure function.

The rate is recomputed from the step number before every optimizer step, so resuming needs no
scheduler state: the step number alone puts the schedule back where it was.
"""

from __future__ import annotations

import math

from megaquant.train.config import OptimConfig


def lr_at(step: int, max_steps: int, optim: OptimConfig) -> float:
    """The rate for optimizer step ``step`` (0-based) of ``max_steps``.

    Warm-up: ``lr * (step + 1) / warmup_steps`` (never 0, so step 0 already moves). Decay from
    ``lr`` at the end of warm-up to ``min_lr`` at the last step.
    """
    sched, peak = optim.sched, optim.lr
    if step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    if sched.decay == "constant":
        return peak
    span = max(1, max_steps - 1 - sched.warmup_steps)
    t = min(1.0, (step - sched.warmup_steps) / span)
    if sched.decay == "linear":
        shape = 1.0 - t
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    return sched.min_lr + (peak - sched.min_lr) * shape
