"""Max calibration: the amax of a tensor role is the largest |x| seen over all calibration batches.

A calibrator has three verbs, the same for every algorithm (ModelOpt's shape):
``collect(x)`` folds one batch in, ``reset()`` forgets, ``compute_amax()`` returns the statistic
(or ``None`` when nothing was collected, e.g. an expert that received no tokens).

The statistic's shape is the format's: ``fmt.compute_amax(x)`` is a scalar for per-tensor formats
and a keep-dim vector for per-channel ones, so max calibration is an elementwise running max.
"""

from __future__ import annotations

import torch

from megaquant.formats import QuantFormat


class MaxCalibrator:
    """Running elementwise max of ``fmt.compute_amax(x)`` over collected batches."""

    def __init__(self, fmt: QuantFormat):
        self.fmt = fmt
        self._amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        amax = self.fmt.compute_amax(x.detach())
        # torch.maximum propagates NaN, so a single bad batch stays visible to the caller's check.
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)

    def reset(self) -> None:
        self._amax = None

    def compute_amax(self) -> torch.Tensor | None:
        return self._amax
