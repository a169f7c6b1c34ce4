"""Hydra glue: the job schemas, and ``recipes/`` as the config group ``recipe`` (``+recipe=NAME``).

Recipes live outside ``configs/`` because they are also used without Hydra
(``megaquant.quantize(model, "nvfp4")``); registering them in Hydra's ConfigStore makes them a
group without copying them.

A recipe file anywhere (``+recipe=/runs/auto/recipe.yaml``, as the mixed-precision search
writes) is a group option too: Hydra would look for ``recipe//runs/...`` among the group's
options, so :func:`recipe_path_overrides` registers the file under a name of its own
(``_file_<stem>``) and rewrites the argument to choose it, before Hydra reads the command line.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from megaquant.jobs.schema import register_schemas
from megaquant.recipe import RECIPE_DIR

RECIPE_SUFFIXES = (".yaml", ".yml")


def register_recipes() -> None:
    register_schemas()
    cs = ConfigStore.instance()
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path))


def recipe_path_overrides(argv: list[str], keys=("recipe",), group: str = "recipe") -> list[str]:
    """``argv`` with every ``[+]<key>=<file>.yaml`` replaced by a registered group option.

    ``keys``: the spellings of the override (``recipe`` for PTQ; QAT passes the
    ``model/quantization`` group). A file that does not exist is an error naming it.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not (sep and key.lstrip("+~") in keys and value.endswith(RECIPE_SUFFIXES)):
            out.append(arg)
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"{key}={value}: recipe file {str(path)!r} does not exist; pass a "
                             "recipe YAML path or a built-in name (recipes/*.yaml)")
        name = "_file_" + re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
        ConfigStore.instance().store(group=group, name=name, node=OmegaConf.load(path))
        out.append(f"{key}={name}")
    return out
