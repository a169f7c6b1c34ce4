"""Typed training settings, laid out as NeMo lays them out (``trainer.*``, ``model.optim.*``).

Each block is a small dataclass built with ``from_dict``, which refuses keys it does not know
and names the valid ones (a typo such as ``trainer.max_step`` fails at start-up, on every rank,
instead of being silently ignored). The Hydra file ``configs/qat.yaml`` holds the defaults;
these classes hold the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from megaquant.strict import from_dict as _from_dict

PRECISIONS = ("auto", "32", "bf16-mixed")
DECAYS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class SchedConfig:
    """``model.optim.sched``: linear warm-up to ``lr``, then decay to ``min_lr`` at the last
    step."""

    warmup_steps: int = 0
    min_lr: float = 0.0
    decay: str = "cosine"

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"model.optim.sched.warmup_steps must be >= 0, "
                             f"got {self.warmup_steps}")
        if self.decay not in DECAYS:
            raise ValueError(f"model.optim.sched.decay must be one of {DECAYS}, got {self.decay!r}")


@dataclass(frozen=True)
class OptimConfig:
    """``model.optim``: AdamW (decoupled weight decay, not applied to 1-D params)."""

    name: str = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    sched: SchedConfig = field(default_factory=SchedConfig)

    def __post_init__(self):
        if self.name != "adamw":
            raise ValueError(f"model.optim.name must be 'adamw' (the only optimizer wired up), "
                             f"got {self.name!r}")
        if not (self.lr > 0 and self.sched.min_lr <= self.lr):
            raise ValueError(f"need 0 < model.optim.lr and model.optim.sched.min_lr <= lr, got "
                             f"lr={self.lr}, min_lr={self.sched.min_lr}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "OptimConfig":
        values = dict(values or {})
        sched = _from_dict(SchedConfig, values.pop("sched", None), "model.optim.sched")
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return _from_dict(cls, {**values, "sched": sched}, "model.optim")


@dataclass(frozen=True)
class DistillConfig:
    """``model.distill``: QAD. Loss = ``lm_weight`` * next-token NLL + ``kl_weight`` * KL.

    The KL is KL(teacher || student) of the next-token distributions at ``temperature``
    (scaled by temperature**2, Hinton et al., so gradients keep their size as it changes);
    the teacher is the unquantized model with the same weights it started from, or, with
    ``teacher`` set, an unquantized checkpoint of the same architecture (a directory: a Hugging
    Face LLaMA-family model, or a megaquant checkpoint written without a recipe).
    """

    enabled: bool = False
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    teacher: str | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"model.distill.temperature must be > 0 (1.0: the plain KL; "
                             f"larger values soften both distributions), got {self.temperature}")
        if self.enabled and self.kl_weight == 0 and self.lm_weight == 0:
            raise ValueError("model.distill: kl_weight and lm_weight are both 0: nothing to train")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "DistillConfig":
        return _from_dict(cls, values, "model.distill")


@dataclass(frozen=True)
class LearnableScalesConfig:
    """``model.learnable_scales``: LSQ-style learned amax (megaquant.train.learnable).

    ``enabled``: learn the global/per-tensor amax of every static quantizer that has one.
    ``per_block``: also learn the per-block amax of NVFP4 and INT4 weights (INT4 has nothing
    else to learn). ``lr_scale``: the scales' learning rate is ``model.optim.lr * lr_scale``;
    scales never get weight decay (a decayed amax would shrink toward clipping everything).
    """

    enabled: bool = False
    per_block: bool = False
    lr_scale: float = 1.0

    def __post_init__(self):
        if not self.lr_scale > 0:
            raise ValueError(f"model.learnable_scales.lr_scale must be > 0, got {self.lr_scale}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "LearnableScalesConfig":
        return _from_dict(cls, values, "model.learnable_scales")


@dataclass(frozen=True)
class TrainerConfig:
    """``trainer``: how long, how often, how precise."""

    max_steps: int = 20
    log_every_n_steps: int = 1
    val_check_interval: int = 0      # evaluate every N steps; 0: only before and after
    save_every_n_steps: int = 0      # 0: save only at the end
    keep_checkpoints: int = 2
    gradient_clip_val: float = 1.0   # 0: no clipping
    precision: str = "auto"
    resume: bool = True              # continue from <output_dir>/checkpoints if one is there

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"trainer.max_steps must be >= 0, got {self.max_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")
        if self.keep_checkpoints < 1:
            raise ValueError("trainer.keep_checkpoints must be >= 1")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "TrainerConfig":
        return _from_dict(cls, values, "trainer")


@dataclass(frozen=True)
class BatchConfig:
    """Sequences per optimizer step (all DP ranks) and per forward."""

    global_batch_size: int
    micro_batch_size: int

    def micro_batches_per_rank(self, dp: int) -> int:
        """Gradient-accumulation steps per rank; the global batch must split evenly."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ValueError(
                f"model.global_batch_size {self.global_batch_size} is not a multiple of "
                f"model.micro_batch_size {self.micro_batch_size} x data parallel {dp}; set it "
                f"to a multiple of {per_step}")
        return self.global_batch_size // per_step


def resolve_precision(precision: str, cuda: bool, bf16_ok: bool) -> str:
    """``auto`` -> ``bf16-mixed`` on a GPU with bf16, else ``32`` (CPU autocast only slows down)."""
    if precision == "auto":
        return "bf16-mixed" if cuda and bf16_ok else "32"
    return precision
