"""Quantization-aware training (QAT) or distillation (QAD) of a Megatron-Core model.

    torchrun --nproc-per-node=2 scripts/qat.py model.quantization=nvfp4
    python scripts/qat.py model.quantization=int4_w4a16 model.distill.enabled=true
    python scripts/qat.py model=tiny model.quantization=null trainer.max_steps=5
    python scripts/qat.py model.quantization=/runs/auto/recipe.yaml   # a recipe file anywhere

Config: configs/qat.yaml (NeMo layout); recipes: recipes/*.yaml as the group model/quantization.
See docs/qat.md.
"""

import sys

import hydra
from omegaconf import DictConfig

from megaquant.jobs.hydra import recipe_path_overrides
from megaquant.jobs.qat import nemo_style_overrides, register_quantization_group, run

register_quantization_group()
sys.argv[1:] = recipe_path_overrides(nemo_style_overrides(sys.argv[1:]),
                                     keys=("model/quantization",), group="model/quantization")


@hydra.main(version_base=None, config_path="../configs", config_name="qat")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
