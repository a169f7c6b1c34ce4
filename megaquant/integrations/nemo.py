"""Quantize a NeMo / Megatron-Bridge model for QAT at set-up, from that framework's own config.

Which versions: NeMo 2 (``nemo.collections.llm``, NeMo 24.x/25.x containers) and Megatron-Bridge
build plain Megatron-Core ``GPTModel``s, which is what megaquant converts; call
:func:`quantize_for_training` on the model (or list of model chunks) they hand you, after the
weights are loaded and before the optimizer is built. The ``nemo-toolkit`` 3.0 wheel on PyPI has
no LLM collection (``nemo.collections.llm`` is gone), so nothing here imports NeMo: this module
only reads configs (an OmegaConf ``DictConfig``, a dataclass, a dict, a recipe name) and walks
modules, and works with whichever release built the model. Tested here with OmegaConf configs
and dataclasses on megaquant's own GPT (no NeMo install).

A NeMo-style model config carries the recipe as ``model.quantization`` (``null``: train
unquantized); pass either that node or the whole model config.

    from megaquant.integrations.nemo import quantize_for_training
    report = quantize_for_training(model, cfg.model, forward_loop=calib_loop, dp_group=dp)

Only linears whose class megaquant knows are converted (Megatron's local Column/RowParallel
linears, TE's linears where TE is installed); the report names what was skipped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from torch import nn


def recipe_from_config(cfg: Any) -> dict | str | None:
    """The recipe a config asks for: a dict, a built-in name, or None (no quantization).

    Accepts a recipe node (has ``rules``), a model config holding ``quantization``, a recipe
    name or YAML path, None, an OmegaConf node or a dataclass of either.
    """
    if cfg is None or isinstance(cfg, (str, Path)):
        return None if cfg is None else str(cfg)
    cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"quantization config must be a mapping, dataclass, name or None, got "
                        f"{type(cfg).__name__}")
    if "rules" in cfg:
        return cfg
    if "quantization" in cfg:
        return recipe_from_config(cfg["quantization"])
    raise ValueError(f"config has neither 'rules' (a recipe) nor 'quantization' (a model config "
                     f"with a recipe); keys: {sorted(cfg)}")


def _plain(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    from omegaconf import DictConfig, OmegaConf  # a dependency, via hydra-core

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / Float16Module wrappers (each keeps it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def quantize_for_training(model: "nn.Module | list[nn.Module]", cfg: Any,
                          forward_loop: Callable[[nn.Module], None] | None = None, *,
                          dp_group=None, init_from: str | Path | None = None):
    """Quantize ``model`` (or each chunk of a list) in place for QAT; returns the report(s).

    ``init_from``: a megaquant PTQ directory whose calibrated state is loaded instead of
    calibrating (its recipe must equal ``cfg``'s; a different one is an error naming both).
    Returns None when the config asks for no quantization.
    """
    import megaquant
    from megaquant.megatron.checkpoint import load_checkpoint
    from megaquant.ptq import restore
    from megaquant.train.state import check_compatible

    recipe = recipe_from_config(cfg)
    if recipe is None:
        return None
    chunks = [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    reports = []
    for chunk in chunks:
        if init_from is not None:
            # Refuse a PTQ output made with another recipe before touching the model.
            check_compatible(Path(init_from), recipe_dict(recipe), kind="ptq")
            reports.append(restore(chunk, recipe))
            load_checkpoint(chunk, init_from)
        else:
            reports.append(megaquant.quantize(chunk, recipe, forward_loop, dp_group=dp_group))
    return reports if isinstance(model, (list, tuple)) else reports[0]


def recipe_dict(recipe: dict | str) -> dict:
    """A recipe as the mapping a checkpoint's metadata stores (built-in names read from YAML)."""
    if isinstance(recipe, dict):
        return recipe
    import yaml

    from megaquant.recipe import RECIPE_DIR, load_recipe

    load_recipe(recipe)  # validates the name, with the list of valid ones on error
    path = Path(recipe) if str(recipe).endswith((".yaml", ".yml")) else RECIPE_DIR / f"{recipe}.yaml"
    return yaml.safe_load(path.read_text())
