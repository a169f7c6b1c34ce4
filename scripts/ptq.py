"""Post-training quantization of a Megatron-Core model.

    torchrun --nproc-per-node=2 scripts/ptq.py +recipe=nvfp4
    torchrun --nproc-per-node=3 scripts/ptq.py +recipe=fp8 parallel.tp=3
    python scripts/ptq.py +recipe=int8 model=tiny data.calib_samples=4
    python scripts/ptq.py +recipe=/runs/auto/recipe.yaml     # a recipe file anywhere

Config: configs/ptq.yaml (groups model, parallel, data); recipes: recipes/*.yaml.
"""

import sys

import hydra
from omegaconf import DictConfig

from megaquant.jobs.hydra import recipe_path_overrides, register_recipes
from megaquant.jobs.ptq import run

register_recipes()
sys.argv[1:] = recipe_path_overrides(sys.argv[1:])


@hydra.main(version_base=None, config_path="../configs", config_name="ptq")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
