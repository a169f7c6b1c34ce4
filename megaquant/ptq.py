"""``megaquant.quantize``: convert a built model, configure it from a recipe, calibrate it."""

from __future__ import annotations

from typing import Callable

from torch import nn

from megaquant.calib.calibrate import calibrate
from megaquant.calib.passes import apply_pins, run_algorithm
from megaquant.convert import ConversionReport, apply_recipe, convert_model
from megaquant.recipe import Recipe, load_recipe
from megaquant.recipe_calib import CalibConfig, check_recipe_roles


def quantize(
    model: nn.Module,
    recipe: "str | dict | Recipe",
    forward_loop: Callable[[nn.Module], None] | None = None,
    *,
    dp_group=None,
    world_group=None,
    calib: "str | dict | CalibConfig | None" = None,
    share_expert_inputs: bool = False,
) -> ConversionReport:
    """Quantize ``model`` in place and return what was converted and skipped.

    ``recipe``: a built-in name (``"nvfp4"``), a YAML path, a mapping or a :class:`Recipe`.
    ``forward_loop(model)`` runs calibration batches; it is only called when the recipe has
    static activation scales. Process groups are explicit: each layer reduces over its own
    ``tp_group``; pass ``dp_group`` when the job is data-parallel (the amax of every quantizer is
    reduced over it), and ``world_group`` if the default group is not the whole job.

    ``calib`` overrides the recipe's ``calib:`` section (``"gptq"``, ``{"algorithm": "awq",
    "grid": 10}``; ``"max"`` for plain round-to-nearest). The algorithm runs before max
    calibration and may rewrite weights and norms (:mod:`megaquant.calib.passes`); the amax
    values it rounded with are stored after max calibration.

    ``share_expert_inputs``: give all routed experts one input amax (the max over every expert
    on every EP rank), as a grouped GEMM with a single activation scale needs.
    """
    recipe = load_recipe(recipe)
    algo = _calib_config(recipe, calib)
    report = convert_model(model, recipe)
    apply_recipe(model, recipe, report)
    pins = run_algorithm(model, algo, forward_loop, dp_group)
    report.calibration = calibrate(model, forward_loop, dp_group=dp_group, world_group=world_group,
                                   share_expert_inputs=share_expert_inputs)
    apply_pins(pins)
    report.calibration["algorithm"] = algo.name
    if algo.needs_data:
        report.calibration["used_forward_loop"] = True
    return report


def _calib_config(recipe: Recipe, calib) -> CalibConfig:
    if calib is None:
        return recipe.calib
    algo = calib if isinstance(calib, CalibConfig) else CalibConfig.from_dict(calib)
    check_recipe_roles(algo, recipe.roles())
    return algo


def restore(model: nn.Module, recipe: "str | dict | Recipe") -> ConversionReport:
    """Convert and configure ``model`` as :func:`quantize` would, without calibrating.

    Static amax buffers are created with their final shapes (zeros), ready to be filled by
    :func:`load_quantized` or ``load_state_dict``.
    """
    from megaquant.calib.calibrate import prime_amax
    from megaquant.calib.passes import prepare_algorithms

    recipe = load_recipe(recipe)
    report = convert_model(model, recipe)
    apply_recipe(model, recipe, report)
    prepare_algorithms(model, recipe.calib)
    prime_amax(model)
    return report


def load_quantized(model: nn.Module, directory) -> dict:
    """Load a megaquant PTQ checkpoint (weights + quantizer state) into ``model`` at any TP size.

    The recipe is read from the checkpoint's metadata; returns that metadata.
    """
    import json
    from pathlib import Path

    from megaquant.megatron.checkpoint import METADATA_FILE, load_checkpoint

    meta_path = Path(directory) / METADATA_FILE
    if not meta_path.exists():
        raise ValueError(f"{directory} is not a megaquant checkpoint (no {METADATA_FILE})")
    meta = json.loads(meta_path.read_text())["metadata"]
    if "recipe_config" not in meta:
        raise ValueError(f"{directory} holds no quantization recipe: load it with load_checkpoint")
    restore(model, meta["recipe_config"])
    return load_checkpoint(model, directory)
