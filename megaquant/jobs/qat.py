"""The QAT / QAD job: build, (calibrate or load PTQ state), train with fake quantization, save.

Runs under torchrun, srun or a single process, on CPU (gloo) or GPU (NCCL). Config:
``configs/qat.yaml`` (NeMo layout: ``trainer.*``, ``model.*``, ``model.quantization``,
``model.optim``, ``model.distill``). Writes to ``run.output_dir``: ``checkpoints/step_*``
(train checkpoints: weights, quantizer and optimizer state, RNG) with ``checkpoints/latest``,
and ``summary.json``. Resumes from ``checkpoints/latest`` when ``trainer.resume`` is true.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from megaquant.jobs.common import (
    check_data_sizes,
    is_rank0,
    load_model_source,
    resolve_text,
    token_batches,
    write_json_atomic,
)
from megaquant.jobs.schema import validate
from megaquant.recipe import canonical_recipe
from megaquant.train.config import (
    BatchConfig,
    DistillConfig,
    LearnableScalesConfig,
    OptimConfig,
    TrainerConfig,
    resolve_precision,
)

log = logging.getLogger("megaquant.qat")
MODEL_KEYS_OWN = ("optim", "distill", "quantization", "init_from", "micro_batch_size",
                  "global_batch_size", "learnable_scales")


def register_quantization_group() -> None:
    """Recipes as the Hydra group ``model/quantization`` (placed at ``model.quantization``).

    The same files ``jobs.hydra.register_recipes`` registers as ``recipe`` for PTQ; QAT needs
    them where NeMo keeps its quantization settings. Also registers the ``mq_mode`` resolver
    (``qat``/``qad``) that names the output directory.
    """
    from hydra.core.config_store import ConfigStore

    from megaquant.jobs.schema import register_schemas
    from megaquant.recipe import RECIPE_DIR

    register_schemas()
    cs = ConfigStore.instance()
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        cs.store(group="model/quantization", name=path.stem, node=OmegaConf.load(path))
    if not OmegaConf.has_resolver("mq_mode"):
        OmegaConf.register_new_resolver("mq_mode", lambda qad: "qad" if qad else "qat")


def nemo_style_overrides(argv: list[str]) -> list[str]:
    """Rewrite NeMo's ``model.quantization=NAME`` into Hydra's group syntax.

    NeMo users choose the recipe with a dot (``model.quantization=nvfp4``); Hydra chooses a
    config-group option with a slash (``model/quantization=nvfp4``) and removes one with
    ``~model/quantization``. Field overrides (``model.quantization.<field>=...``) are already
    plain value overrides and pass through, as does every other argument.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "model.quantization":
            out.append("~model/quantization" if value in ("null", "None", "none", "")
                       else f"model/quantization={value}")
        else:
            out.append(arg)
    return out


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def resolve_init_from(path: str | None) -> Path | None:
    """A PTQ output directory or its ``checkpoint/`` subdirectory -> the checkpoint directory."""
    if path is None:
        return None
    p = Path(path)
    if (p / "checkpoint" / "megaquant.json").exists():
        return p / "checkpoint"
    if not (p / "megaquant.json").exists():
        raise ValueError(f"model.init_from={path!r} is not a megaquant PTQ output (no "
                         "megaquant.json in it or in its checkpoint/); run scripts/ptq.py first "
                         "or set model.init_from=null to calibrate here")
    return p


# GPTConfig fields a teacher may differ in: they change neither the shapes nor the vocabulary
TEACHER_FREE_FIELDS = ("name", "seq_length", "params_dtype", "init_method_std", "hidden_dropout",
                       "attention_dropout", "max_position_embeddings", "hf_family")


def load_teacher_source(path: str, student, seq: int):
    """``model.distill.teacher`` -> a LoadedModel, refused unless it fits the student.

    The KL compares the two next-token distributions position by position, so the teacher must
    read the same token ids (same tokenizer and vocabulary) and, because it is built and
    sharded exactly like the student (same TP/EP layout, same layer code), have the same
    architecture. A quantized megaquant checkpoint is refused: QAD distils from full precision.
    """
    from megaquant.megatron.checkpoint import read_metadata

    p = Path(path)
    if (p / "config.json").exists():
        source = "hf"
    elif (p / "megaquant.json").exists() or (p / "checkpoint" / "megaquant.json").exists():
        p = p if (p / "megaquant.json").exists() else p / "checkpoint"
        source = "megatron"
        recipe = read_metadata(p).get("metadata", {}).get("recipe")
        if recipe is not None:
            raise ValueError(f"model.distill.teacher={path!r} is a quantized checkpoint (recipe "
                             f"{recipe!r}); the teacher must be unquantized: give the Hugging "
                             "Face directory it came from, or null (the student's own starting "
                             "weights)")
    else:
        raise ValueError(f"model.distill.teacher={path!r} is neither a Hugging Face model "
                         "directory (config.json) nor a megaquant checkpoint (megaquant.json); "
                         "use one of those, or null (the student's own starting weights)")
    teacher = load_model_source({"source": source, "path": str(p), "seq_length": seq})
    check_teacher_fits(vars(student.arch), vars(teacher.arch), path)
    probe = "Distillation compares token ids: def f(x): return x ** 2  # 3.14"
    if teacher.tokenizer.encode(probe) != student.tokenizer.encode(probe):
        raise ValueError(f"model.distill.teacher={path!r} tokenizes text differently from the "
                         "student model: the KL needs the same token ids; use a teacher with "
                         "the student's tokenizer")
    return teacher


def check_teacher_fits(student: dict, teacher: dict, path: str) -> None:
    """Refuse a teacher architecture that differs from the student's, naming each field."""
    diff = {k: (student.get(k), teacher.get(k)) for k in sorted(set(student) | set(teacher))
            if k not in TEACHER_FREE_FIELDS and student.get(k) != teacher.get(k)}
    if diff:
        listed = ", ".join(f"{k}: teacher {t}, student {s}" for k, (s, t) in diff.items())
        raise ValueError(f"model.distill.teacher={path!r} has another architecture than the "
                         f"student model ({listed}); the teacher must have the student's "
                         "architecture (same layers, sizes and vocabulary), e.g. the unquantized "
                         "or fine-tuned version of the same model, or be null (the student's own "
                         "starting weights)")


def _settings(cfg: DictConfig):
    from megaquant.integrations.nemo import recipe_dict

    model = OmegaConf.to_container(cfg.model, resolve=True)
    quant = model.get("quantization")
    recipe = None if quant is None else recipe_dict(quant)
    trainer = TrainerConfig.from_dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    optim = OptimConfig.from_dict(model.get("optim"))
    distill = DistillConfig.from_dict(model.get("distill"))
    batch = BatchConfig(int(model["global_batch_size"]), int(model["micro_batch_size"]))
    scales = LearnableScalesConfig.from_dict(model.get("learnable_scales"))
    return model, recipe, trainer, optim, distill, batch, scales


def _data(cfg: DictConfig, tokenizer, seq: int):
    d = cfg.data
    train_path = resolve_text(d.get("train_text") or d.calib_text, "default_calib_text")
    eval_path = resolve_text(d.eval_text, "default_eval_text")
    train = torch.cat(token_batches(train_path, tokenizer, int(d.train_samples), seq, 1))
    calib = [b[:, :-1] for b in token_batches(train_path, tokenizer, int(d.calib_samples), seq,
                                               int(d.micro_batch))]
    evals = token_batches(eval_path, tokenizer, int(d.eval_samples), seq, int(d.micro_batch))
    return train, calib, evals


def run(cfg: DictConfig) -> dict:
    """Run QAT (or QAD) as configured; returns the summary (also summary.json on rank 0)."""
    from megaquant.megatron.dist import explain_timeouts, init_distributed
    from megaquant.outdir import claim_output_dir
    from megaquant.train.learnable import check_resume
    from megaquant.train.state import check_compatible, recover_step_leftovers, resume_checkpoint

    t0 = time.perf_counter()
    validate(cfg, "qat")
    model_cfg, recipe, trainer, optim, distill, batch, scales = _settings(cfg)
    check_data_sizes(cfg)
    init_from = resolve_init_from(model_cfg.get("init_from"))
    ckpt_root = Path(cfg.run.output_dir) / "checkpoints"
    env = init_distributed(timeout_s=float(cfg.run.timeout_s))
    with explain_timeouts(), claim_output_dir(cfg.run.output_dir, overwrite=True, staging=False):
        if is_rank0():  # under the lock: nobody else is writing these
            for note in recover_step_leftovers(ckpt_root):
                log.warning("%s", note)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        latest = resume_checkpoint(ckpt_root) if trainer.resume else None  # verified, or older
        if latest is not None:  # a recipe mismatch fails now, not after calibration
            check_resume(check_compatible(latest, recipe), scales, latest)
        return _run_locked(cfg, env, t0, model_cfg, recipe, trainer, optim, distill, batch,
                           scales, init_from, ckpt_root, latest)


def _run_locked(cfg, env, t0, model_cfg, recipe, trainer, optim, distill, batch, scales,
                init_from, ckpt_root, latest) -> dict:
    """The QAT run proper, with ``run.output_dir`` locked against a second run."""
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.integrations.nemo import quantize_for_training
    from megaquant.jobs.ptq import (
        _even_over_dp,
        build_model,
        check_pipeline_support,
        pipeline_stage,
        staged_passes,
    )
    from megaquant.megatron.dist import init_model_parallel
    from megaquant.train.learnable import enable_learnable_scales
    from megaquant.train.loop import train
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state, save_train_state
    from megaquant.train.step import StepContext

    par = cfg.parallel
    loaded = load_model_source(model_cfg)
    loaded.arch.check_tensor_parallel(int(par.tp))
    loaded.arch.check_expert_parallel(int(par.ep))
    check_pipeline_support(loaded.arch, par)
    teacher_source = None
    if distill.enabled and distill.teacher is not None:  # before any heavy work
        teacher_source = load_teacher_source(distill.teacher, loaded, int(model_cfg["seq_length"]))
    groups = init_model_parallel(tp=int(par.tp), pp=int(par.pp), ep=int(par.ep),
                                 seed=int(cfg.run.seed))
    batch.micro_batches_per_rank(groups.dp)  # also what keeps EP ranks' token exchanges paired
    stage = pipeline_stage(loaded.arch, par, groups)
    model = build_model(loaded, groups, "spec", seed=int(cfg.run.seed), stage=stage)
    evaluate_loss, run_forward = staged_passes(groups, evaluate_loss, run_forward)
    train_windows, calib, evals = _data(cfg, loaded.tokenizer, int(model_cfg["seq_length"]))
    if groups.ep > 1:  # every DP rank must run as many forwards as its EP peers (ptq.py)
        calib, evals = _even_over_dp(calib, groups.dp), _even_over_dp(evals, groups.dp)
    teacher = None
    if distill.enabled:
        # built and staged like the student (its activations travel with the student's under
        # PP), quantizers off: the student's own starting weights, or model.distill.teacher
        # (checked against the student above)
        if teacher_source is None:
            teacher = build_model(loaded, groups, "spec", seed=int(cfg.run.seed), stage=stage)
            teacher.load_state_dict(model.state_dict(), strict=True)
        else:
            teacher = build_model(teacher_source, groups, "spec", seed=int(cfg.run.seed),
                                  stage=stage)
        teacher.eval().requires_grad_(False)
    evaluate = lambda m: evaluate_loss(m, evals, groups.dp_group)  # noqa: E731
    losses = {"fp": evaluate(model)}
    quantize_for_training(model, recipe, lambda m: run_forward(m, calib, "calibrate",
                                                               groups.dp_group),
                          dp_group=groups.dp_group, init_from=init_from)
    losses["ptq"] = evaluate(model) if recipe is not None else losses["fp"]
    if is_rank0():  # before training: a run stopped early still shows its starting point
        log.info("eval loss before training: fp %.4f | ptq %.4f", losses["fp"], losses["ptq"])

    precision = resolve_precision(trainer.precision, torch.cuda.is_available(),
                                  torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    enable_learnable_scales(model, scales)  # after calibration / init_from, before resume
    optimizer = build_optimizer(model, optim, scales.lr_scale)
    layout = {"tp": groups.tp, "pp": groups.pp, "dp": groups.dp, "ep": groups.ep,
              "world_size": env.world_size}
    meta = {"recipe": None if recipe is None else recipe.get("name"),
            "recipe_config": canonical_recipe(recipe),
            "arch": dict(vars(loaded.arch)), "distill": vars(distill),
            "learnable_scales": vars(scales),
            "parallel": {"tp": groups.tp, "pp": groups.pp, "dp": groups.dp, "ep": groups.ep}}
    start = 0
    if latest is not None:
        start = load_train_state(model, optimizer, latest, recipe_config=recipe,
                                 layout=layout, verify=False)["step"]
        if is_rank0():
            log.info("resumed from %s at step %d", latest, start)
    ctx = StepContext(train_windows, batch, groups.dp_group, groups.tp_group, distill, teacher,
                      trainer.gradient_clip_val, precision).with_expert_groups(groups)
    if groups.pp > 1:
        ctx = dataclasses.replace(ctx, pipeline=groups)
    t_setup = time.perf_counter()
    records = train(model, optimizer, ctx, trainer=trainer, optim=optim, start_step=start,
                    save=lambda step: save_train_state(model, optimizer, ckpt_root, step=step,
                                                       metadata=meta,
                                                       keep=trainer.keep_checkpoints),
                    evaluate=lambda step: evaluate(model))
    t_train = time.perf_counter()
    losses["trained"] = evaluate(model)
    summary = _summary(cfg, recipe, distill, groups, env, precision, losses, records, start,
                       {"setup": t_setup - t0, "train": t_train - t_setup,
                        "total": time.perf_counter() - t0})
    if is_rank0():
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "summary.json", summary)
        log.info("eval loss: fp %.4f | ptq %.4f | %s %.4f", losses["fp"], losses["ptq"],
                 summary["mode"], losses["trained"])
    return summary


def _summary(cfg, recipe, distill, groups, env, precision, losses, records, start, wall) -> dict:
    return {
        "mode": "qad" if distill.enabled else "qat",
        "recipe": None if recipe is None else recipe.get("name"),
        "recipe_config": recipe,
        "parallel": {"tp": groups.tp, "pp": groups.pp, "ep": groups.ep, "dp": groups.dp},
        "world_size": env.world_size, "device": str(env.device), "precision": precision,
        "optimizer": "torch.optim.AdamW (see megaquant/train/optim.py)",
        "steps": {"start": start, "end": start + len(records)},
        "eval": {f"loss_{k}": v for k, v in losses.items()} |
                {f"ppl_{k}": _ppl(v) for k, v in losses.items()},
        "train_losses": [r["loss"] for r in records],
        "tokens_per_s": [r["tokens_per_s"] for r in records],
        # evaluations during training (trainer.val_check_interval): step, eval loss, and the
        # training seconds up to that step (evaluations excluded), for budget curves from one run
        "val": [{"step": r["step"], "loss": r["val_loss"], "ppl": _ppl(r["val_loss"]),
                 "train_s": sum(q["step_s"] for q in records[:i + 1])}
                for i, r in enumerate(records) if "val_loss" in r],
        "wall_s": wall,
    }
