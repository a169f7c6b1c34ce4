"""The recipe's calibration passes: run each ``calib:`` step in order, before max calibration.

Max calibration with round-to-nearest (RTN) takes every scale from the largest value it sees.
The algorithms change *what* gets quantized (the weights, a norm) or *which* amax is used, so
that the same formats lose less. A recipe picks one or a chain::

    calib: {algorithm: smoothquant, alpha: 0.5}    # max | mse | smoothquant | awq | gptq

Each algorithm is one module with a docstring that teaches it and one entry point,
``run(model, opts, forward_loop, dp_group) -> pins``. It may rewrite weights and norms, and it
returns ``{weight_quantizer: amax}``: amax values the algorithm built its result on, which
``quantize`` stores *after* max calibration (max calibration would recompute them from the
rewritten weights, and a clipped weight has a smaller max than the scale it was rounded with).
Options and config-time checks are in :mod:`megaquant.recipe_calib`.
"""

from __future__ import annotations

import torch
from torch import nn

from megaquant.calib import awq, gptq, mse, smoothquant
from megaquant.recipe_calib import CalibConfig

RUNNERS = {"mse": mse.run, "smoothquant": smoothquant.run, "awq": awq.run, "gptq": gptq.run}


def run_algorithm(model: nn.Module, calib: CalibConfig, forward_loop, dp_group) -> dict:
    """Run ``calib``'s passes in order (before max calibration); returns the amax pins."""
    if forward_loop is None and calib.needs_data:
        raise ValueError(f"calib.algorithm={calib.name!r} needs calibration data: pass a "
                         "forward_loop(model) to megaquant.quantize")
    pins = {}
    for step in calib.steps:
        if step.algorithm == "max":
            continue
        with torch.no_grad():
            pins.update(RUNNERS[step.algorithm](model, step.build_options(), forward_loop,
                                                dp_group))
    return pins


def apply_pins(pins: dict) -> None:
    """Store the amax values an algorithm rounded with (after max calibration)."""
    for q, amax in pins.items():
        q.load_amax(amax)
