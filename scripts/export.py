"""Export a megaquant PTQ checkpoint to deployable Hugging Face-style directories.

    python scripts/export.py checkpoint=outputs/ptq/nvfp4/checkpoint output_dir=outputs/export/nvfp4
    python scripts/export.py checkpoint=... output_dir=... layouts=[compressed-tensors] \\
        overwrite=true

Writes <output_dir>/modelopt/ and/or <output_dir>/compressed-tensors/ (config.json with a
quantization_config, *.safetensors with real quantized weights, tokenizer.json) and
<output_dir>/export_report.json. One process, whatever TP/EP layout the checkpoint was saved at
(MoE models are written as Qwen2-MoE, every expert under its global index).
Config: configs/export.yaml; formats and names: docs/export.md.
"""

import hydra
from omegaconf import DictConfig

from megaquant.export.job import ExportConfig, run
from megaquant.jobs.schema import register_schemas, validate

register_schemas()


@hydra.main(version_base=None, config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    run(ExportConfig.from_dict(validate(cfg, "export")))


if __name__ == "__main__":
    main()
