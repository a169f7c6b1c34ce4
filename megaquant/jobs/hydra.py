"""Hydra glue: the job schemas, and ``recipes/`` as the config group ``recipe`` (``+recipe=NAME``).

Recipes live outside ``configs/`` because they are also used without Hydra
(``megaquant.quantize(model, "nvfp4")``); registering them in Hydra's ConfigStore makes them a
group without copying them.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from megaquant.jobs.schema import register_schemas
from megaquant.recipe import RECIPE_DIR


def register_recipes() -> None:
    register_schemas()
    cs = ConfigStore.instance()
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path))
