"""The recipe's calibration passes: run each ``calib:`` step in order, before max calibration.

Max calibration with round-to-nearest (RTN) takes every scale from the largest value it sees.
The algorithms change *what* gets quantized (the weights, a norm) or *which* amax is used, so
that the same formats lose less. A recipe picks one or a chain::

    calib: {algorithm: smoothquant, alpha: 0.5}    # max | mse | smoothquant | awq | gptq | ...

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

from megaquant.calib import (
    awq,
    block_hadamard,
    gptq,
    mse,
    rotate_heads,
    rotate_residual,
    smoothquant,
)
from megaquant.recipe_calib import CalibConfig

RUNNERS = {"mse": mse.run, "smoothquant": smoothquant.run, "awq": awq.run, "gptq": gptq.run,
           "rotate_residual": rotate_residual.run, "block_hadamard": block_hadamard.run,
           "rotate_heads": rotate_heads.run}
# What ``run`` leaves besides weights, norms and amax (an untied output layer, an online
# transform), rebuilt on a model restored from a checkpoint (``megaquant.ptq.restore``).
PREPARERS = {"rotate_residual": rotate_residual.prepare, "block_hadamard": block_hadamard.prepare}


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


def prepare_algorithms(model: nn.Module, calib: CalibConfig) -> None:
    """The structural part of each step (an untied output layer, an online transform), for a
    model restored from a checkpoint: what ``run`` leaves besides weights, norms and amax."""
    for step in calib.steps:
        if step.algorithm in PREPARERS:
            PREPARERS[step.algorithm](model, step.build_options())


def apply_pins(pins: dict) -> None:
    """Store the amax values an algorithm rounded with (after max calibration)."""
    for q, amax in pins.items():
        q.load_amax(amax)
