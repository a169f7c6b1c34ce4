"""The job configs' schemas: Hydra structured configs for ``configs/{ptq,qat,export}.yaml``.

Each YAML file starts its defaults list with its schema (``- ptq_schema``), so Hydra checks
types and refuses unknown keys while composing (``parallel.tp=two``, ``parallel.tpp=2``).
Hydra still *adds* keys given with ``+`` (``+parallel.tpp=2``), so every job also runs
:func:`validate` on the composed config, which refuses them by name. Free-form parts are
validated by megaquant's own strict parsers: the recipe (``recipe`` / ``model.quantization``,
:mod:`megaquant.recipe`), the model architecture (``model.arch``, ``GPTConfig``) and the
training blocks (``trainer``, ``model.optim``, ``model.distill``, :mod:`megaquant.train.config`).

A new job key goes here first (with its default), then into the YAML file that documents it.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from megaquant.strict import check_tree


@dataclass
class ModelConfig:
    """``model``: where the weights come from (see megaquant.jobs.common.MODEL_SOURCES)."""

    source: str = "smollm2"
    path: Optional[str] = None  # directory for source=hf / megatron
    seq_length: int = 512
    arch: Optional[Dict[str, Any]] = None  # GPTConfig fields for source=random


@dataclass
class ParallelConfig:
    """``parallel``: tensor, pipeline and expert parallel sizes (DP takes the remaining ranks)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_first_layers: Optional[int] = None  # uneven pipeline split: layers on the first stage
    pp_last_layers: Optional[int] = None  # ... and on the last stage (the rest split evenly)


@dataclass
class DataConfig:
    """``data``: calibration and evaluation text (null: the embedded Shakespeare)."""

    calib_text: Optional[str] = None
    eval_text: Optional[str] = None
    calib_samples: int = 8
    eval_samples: int = 8
    micro_batch: int = 4


@dataclass
class PTQRunConfig:
    output_dir: str = MISSING
    overwrite: bool = True  # replace an earlier run's output directory (docs/reliability.md)
    seed: int = 1234
    timeout_s: float = 600.0
    save_checkpoint: bool = True
    build: str = "spec"  # spec | convert


@dataclass
class AutoJobConfig:
    """``auto``: the mixed-precision search (megaquant.auto.search.AutoConfig; off while
    ``formats`` is empty). It writes ``recipe.yaml`` beside the checkpoint."""

    formats: List[str] = field(default_factory=list)  # candidates: recipe names or "none"
    effective_bits: float = 0.0  # weight bits per parameter of the quantized linears
    score: str = "fisher"  # fisher | output | kl
    kl_batches: int = 2
    pin: Dict[str, str] = field(default_factory=dict)  # module glob -> candidate
    compare: bool = False  # also compute the other scores (for the comparison table)


@dataclass
class PTQJob:
    """``configs/ptq.yaml``; the recipe is chosen with ``+recipe=NAME`` (free-form here)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: PTQRunConfig = field(default_factory=PTQRunConfig)
    recipe: Any = None
    auto: AutoJobConfig = field(default_factory=AutoJobConfig)


@dataclass
class QATModelConfig(ModelConfig):
    """``model`` of a QAT job: the source plus NeMo's training keys."""

    micro_batch_size: int = 1
    global_batch_size: int = 4
    init_from: Optional[str] = None
    optim: Dict[str, Any] = field(default_factory=dict)  # train.config.OptimConfig
    distill: Dict[str, Any] = field(default_factory=dict)  # train.config.DistillConfig
    learnable_scales: Dict[str, Any] = field(default_factory=dict)  # LearnableScalesConfig
    quantization: Any = None  # a recipe (the group model/quantization), absent: unquantized


@dataclass
class QATDataConfig(DataConfig):
    train_text: Optional[str] = None
    train_samples: int = 128


@dataclass
class QATRunConfig:
    output_dir: str = MISSING
    seed: int = 1234
    timeout_s: float = 600.0


@dataclass
class QATJob:
    """``configs/qat.yaml``. ``model`` is a plain mapping for Hydra, because removing the group
    ``model/quantization`` must leave no ``quantization`` key; :func:`validate` checks it."""

    trainer: Dict[str, Any] = field(default_factory=dict)  # train.config.TrainerConfig
    model: Dict[str, Any] = field(default_factory=dict, metadata={"schema": QATModelConfig})
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: QATDataConfig = field(default_factory=QATDataConfig)
    run: QATRunConfig = field(default_factory=QATRunConfig)


@dataclass
class ExportJob:
    """``configs/export.yaml`` (megaquant.export.job.ExportConfig holds the rules)."""

    checkpoint: str = MISSING
    output_dir: str = MISSING
    layouts: Any = "auto"  # "auto" or a list of layout names
    overwrite: bool = False
    max_shard_bytes: int = 5 * 1024**3
    # unquantized tensors: auto (the source's dtype) | bfloat16 | float16 | float32
    dtype: str = "auto"
    tokenizer: str = "auto"
    timeout_s: float = 600.0


SCHEMAS = {"ptq": PTQJob, "qat": QATJob, "export": ExportJob}


def register_schemas() -> None:
    """Store the schemas as ``<job>_schema`` in Hydra's ConfigStore (the YAML files name them)."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)


def validate(cfg: DictConfig, job: str) -> dict:
    """The composed config as a plain dict, after refusing keys the job's schema lacks."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    check_tree(values, SCHEMAS[job])
    return values
