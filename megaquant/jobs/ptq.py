"""The PTQ job: build a Megatron GPT, load weights, evaluate, quantize + calibrate, evaluate, save.

Runs the same under torchrun, srun or a single process, on CPU (gloo) or GPU (NCCL). Writes to
``run.output_dir``: ``checkpoint/`` (Megatron distributed checkpoint with quantizer state),
``summary.json`` and ``report.md``, all three staged and committed with one rename under the
output directory's lock (``megaquant.outdir``); ``run.overwrite=false`` refuses a non-empty one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import megaquant
from megaquant.jobs.common import (
    check_data_sizes,
    is_rank0,
    load_model_source,
    resolve_text,
    source_dtype,
    token_batches,
    write_json_atomic,
)
from megaquant.jobs.schema import validate
from megaquant.recipe import available_recipes, load_recipe

log = logging.getLogger("megaquant.ptq")


def build_model(loaded, groups, build: str, seed: int = 1234, stage=None):
    """The GPT model for this rank (its pipeline ``stage``'s layers only when given), weights
    loaded; its linears quantized when build='spec'.

    A random MoE model is drawn from ``seed`` in full and sharded (``jobs/random_moe.py``), so it
    is the same model at every TP/EP layout."""
    from megaquant.models.gpt import build_gpt_model
    from megaquant.spec import get_spec_provider

    if build not in ("spec", "convert"):
        raise ValueError(f"run.build must be 'spec' or 'convert', got {build!r}")
    backend = get_spec_provider("local") if build == "spec" else None
    hf_state = loaded.hf_state
    if hf_state is None and loaded.checkpoint is None and loaded.arch.num_moe_experts:
        from megaquant.jobs.random_moe import random_moe_hf_state

        hf_state = random_moe_hf_state(loaded.arch, seed)
    full = None
    if stage is not None and hf_state is None and loaded.checkpoint is None:
        # model.source=random: initialise the whole model as PP=1 does (same RNG stream) and
        # keep this stage's share, so a random model is the same at every pipeline size.
        full = build_gpt_model(loaded.arch, backend, tp_size=groups.tp, ep_size=groups.ep)
        full = {k: v for k, v in full.state_dict().items() if not k.endswith("_extra_state")}
    model = build_gpt_model(loaded.arch, backend, tp_size=groups.tp, ep_size=groups.ep,
                            stage=stage)
    if full is not None:
        from megaquant.megatron.stages import stage_state

        _load_weights(model, stage_state(full, stage, loaded.arch.tie_embeddings))
    if hf_state is not None:
        from megaquant.megatron.stages import stage_state
        from megaquant.models.mapping import hf_to_megatron

        state = hf_to_megatron(hf_state, loaded.arch, groups.tp_rank, groups.tp,
                               ep_rank=groups.ep_rank, ep_size=groups.ep)
        if stage is not None:
            state = stage_state(state, stage, loaded.arch.tie_embeddings)
        _load_weights(model, state)
    elif loaded.checkpoint is not None:
        from megaquant.megatron.checkpoint import load_checkpoint

        load_checkpoint(model, loaded.checkpoint)
    return model


def _load_weights(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def check_pipeline_support(arch, par) -> None:
    """Refuse, by name, a layer split that cannot work (before any group exists).

    PTQ, QAT and QAD run under PP, PP x TP and PP x EP (``docs/pipeline.md``); the features that
    do not run under PP yet are refused where they are configured (``auto.formats`` in this
    job)."""
    from megaquant.megatron.stages import split_layers

    split_layers(arch.num_layers, int(par.pp), par.get("pp_first_layers"),
                 par.get("pp_last_layers"))


def staged_passes(groups, evaluate_loss, run_forward):
    """The evaluation and calibration forwards for this layout: at parallel.pp > 1 their twins
    that run through Megatron's pipeline schedule (megaquant/megatron/pipeline.py)."""
    if groups.pp == 1:
        return evaluate_loss, run_forward
    from megaquant.megatron.pipeline import pipeline_evaluate_loss, pipeline_run_forward

    return (lambda m, batches, _dp_group: pipeline_evaluate_loss(m, batches, groups),
            lambda m, batches, _desc="forward", _dp_group=None:
            pipeline_run_forward(m, batches, groups))


def pipeline_stage(arch, par, groups):
    """This rank's pipeline stage (None at parallel.pp=1: the whole model)."""
    from megaquant.megatron.stages import stage_layout

    if groups.pp == 1:
        return None
    return stage_layout(arch.num_layers, groups.pp, groups.pp_rank,
                        par.get("pp_first_layers"), par.get("pp_last_layers"))


def _even_over_dp(batches: list, dp: int) -> list:
    """The first multiple of ``dp`` batches: under expert parallelism every MoE layer exchanges
    tokens over EP ranks (which are DP ranks), so a rank with one batch more than its EP peers
    would wait forever in that exchange."""
    keep = len(batches) - len(batches) % dp
    if keep == 0:
        raise ValueError(f"{len(batches)} batches for {dp} data-parallel ranks: with expert "
                         "parallelism every rank needs a batch; raise data.*_samples")
    if keep < len(batches):
        log.warning("expert parallel: using %d of %d batches (a multiple of dp=%d)", keep,
                    len(batches), dp)
    return batches[:keep]


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def run(cfg: DictConfig) -> dict:
    """Run PTQ as configured; returns the summary (also written to summary.json on rank 0)."""
    from megaquant.megatron.dist import explain_timeouts, init_distributed
    from megaquant.outdir import claim_output_dir

    t_start = time.perf_counter()
    inputs = _checked_inputs(cfg)  # bad input fails before the output directory is touched
    init_distributed(timeout_s=float(cfg.run.timeout_s))
    with explain_timeouts(), \
            claim_output_dir(cfg.run.output_dir, overwrite=bool(cfg.run.overwrite)) as out:
        return _run(cfg, out, t_start, *inputs)


def _checked_inputs(cfg: DictConfig):
    """(recipe or None, auto search or None, calibration text, evaluation text), every config
    value checked by name."""
    auto = _auto_config(cfg)
    if cfg.get("recipe") is None and auto is None:
        raise ValueError("choose a recipe: +recipe=NAME (or a .yaml path), one of "
                         f"{available_recipes()}, or search one: auto.formats=[nvfp4,fp8] "
                         "auto.effective_bits=5.0")
    if cfg.get("recipe") is not None and auto is not None:
        raise ValueError("give either +recipe=... or auto.formats=[...], not both")
    validate(cfg, "ptq")
    if auto is not None and int(cfg.parallel.pp) > 1:
        raise ValueError(f"auto.formats with parallel.pp={cfg.parallel.pp}: the mixed-precision "
                         "search does not run under pipeline parallelism yet; search at "
                         "parallel.pp=1 and pass the written recipe.yaml back with +recipe=PATH")
    recipe = None if auto else load_recipe(OmegaConf.to_container(cfg.recipe, resolve=True))
    check_data_sizes(cfg)
    calib_path = resolve_text(cfg.data.calib_text, "default_calib_text")
    eval_path = resolve_text(cfg.data.eval_text, "default_eval_text")
    return recipe, auto, calib_path, eval_path


def _run(cfg: DictConfig, out, t_start: float, recipe, auto, calib_path, eval_path) -> dict:
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    env = init_distributed(timeout_s=float(cfg.run.timeout_s))
    par = cfg.parallel
    loaded = load_model_source(OmegaConf.to_container(cfg.model, resolve=True))
    loaded.arch.check_tensor_parallel(int(par.tp))
    loaded.arch.check_expert_parallel(int(par.ep))
    check_pipeline_support(loaded.arch, par)
    groups = init_model_parallel(tp=int(par.tp), pp=int(par.pp), ep=int(par.ep),
                                 seed=int(cfg.run.seed))
    stage = pipeline_stage(loaded.arch, par, groups)
    t_setup = time.perf_counter()
    model = build_model(loaded, groups, cfg.run.build, seed=int(cfg.run.seed), stage=stage)
    seq, mb = int(cfg.model.seq_length), int(cfg.data.micro_batch)
    # Calibration sees the same seq_length-token inputs as evaluation (which drops the last token).
    calib_full = token_batches(calib_path, loaded.tokenizer, int(cfg.data.calib_samples), seq, mb)
    evals = token_batches(eval_path, loaded.tokenizer, int(cfg.data.eval_samples), seq, mb)
    if groups.ep > 1:
        calib_full, evals = _even_over_dp(calib_full, groups.dp), _even_over_dp(evals, groups.dp)
    calib = [b[:, :-1] for b in calib_full]
    t_loaded = time.perf_counter()

    evaluate_loss, run_forward = staged_passes(groups, evaluate_loss, run_forward)
    loss_fp = evaluate_loss(model, evals, groups.dp_group)
    t_eval_fp = time.perf_counter()
    searched = None
    if auto is not None:
        recipe, searched = _search_recipe(model, auto, calib_full, groups, Path(cfg.run.output_dir))
    report = megaquant.quantize(
        model, recipe, lambda m: run_forward(m, calib, "calibrate", groups.dp_group),
        dp_group=groups.dp_group,
    )
    if stage is not None:  # names and counts of every stage, with global layer numbers
        from megaquant.megatron.stages import gather_report

        gather_report(report, stage, groups.pp_group)
    t_calib = time.perf_counter()
    loss_q = evaluate_loss(model, evals, groups.dp_group)
    t_eval_q = time.perf_counter()

    summary = {
        "recipe": recipe.name,
        "recipe_config": recipe.to_dict(),  # versioned, defaults spelled out
        "model": {"source": cfg.model.source, "name": loaded.arch.name,
                  "arch": {k: v for k, v in vars(loaded.arch).items()}},
        "parallel": {"tp": groups.tp, "pp": groups.pp, "ep": groups.ep, "dp": groups.dp},
        "world_size": env.world_size,
        "device": str(env.device),
        "layers_quantized": sorted(report.enabled_quantizers),
        "layers_skipped": report.skipped,
        "quantizers_enabled": sum(len(v) for v in report.enabled_quantizers.values()),
        "calibration": {**report.calibration, "tokens": sum(b.numel() for b in calib)
                        if report.calibration["used_forward_loop"] else 0},
        "eval_tokens": sum(b.numel() - b.shape[0] for b in evals),
        "eval": {"loss_fp": loss_fp, "ppl_fp": _ppl(loss_fp),
                 "loss_quant": loss_q, "ppl_quant": _ppl(loss_q),
                 "ppl_ratio": _ppl(loss_q) / _ppl(loss_fp)},
        "wall_s": {"setup": t_setup - t_start, "load": t_loaded - t_setup,
                   "eval_fp": t_eval_fp - t_loaded, "quantize_calibrate": t_calib - t_eval_fp,
                   "eval_quant": t_eval_q - t_calib},
    }
    recipe_yaml = None
    if searched is not None:
        recipe_yaml = searched.pop("recipe_yaml")
        summary["auto"] = searched
        summary["wall_s"]["search"] = searched["seconds"]["total"]
    if cfg.run.save_checkpoint:
        from megaquant.finite import check_quantized_finite
        from megaquant.megatron.checkpoint import save_checkpoint

        check_quantized_finite(model, before="saving the checkpoint")  # collective verdict

        meta = {"recipe": recipe.name, "recipe_config": summary["recipe_config"],
                "arch": summary["model"]["arch"], "parallel": summary["parallel"],
                "tokenizer": loaded.tokenizer_source,
                "source_dtype": source_dtype(OmegaConf.to_container(cfg.model, resolve=True),
                                             loaded.arch)}
        save_checkpoint(model, out.staging / "checkpoint", metadata=meta)
    summary["wall_s"]["total"] = time.perf_counter() - t_start
    if is_rank0():
        write_json_atomic(out.staging / "summary.json", summary)
        if recipe_yaml is not None:  # beside the checkpoint: +recipe=<out>/recipe.yaml reuses it
            (out.staging / "recipe.yaml").write_text(recipe_yaml)
        (out.staging / "report.md").write_text(render_report(summary))
    out.commit()  # checkpoint, summary, recipe and report appear together
    if is_rank0():
        log.info("\n%s", render_report(summary))
    return summary


def _auto_config(cfg: DictConfig):
    """The job's ``auto`` block as an AutoConfig, or None when the search is off."""
    block = cfg.get("auto")
    if block is None or not block.get("formats"):
        return None
    from megaquant.auto.search import AutoConfig

    values = OmegaConf.to_container(block, resolve=True)
    compare = values.pop("compare", False)
    auto = AutoConfig(**values)
    check_exportable_mix(auto.formats)
    return auto, compare


def check_exportable_mix(candidates) -> None:
    """Refuse candidates that no export layout can write together in one model.

    A mixed model is written by a layout only if that layout writes every candidate's scheme
    (``megaquant.export.layouts``); candidates that are not exportable at all are left to the
    exporter's own message.
    """
    from megaquant.export import layouts as L
    from megaquant.export.schemes import scheme_of
    from megaquant.recipe import load_recipe

    schemes = {}
    for name in candidates:
        if name == "none":
            continue
        roles = load_recipe(name).resolve("decoder.layers.0.self_attention.linear_qkv")
        fmts = [None if roles[r] is None else roles[r].build_format() for r in ("weight", "input")]
        scheme = scheme_of(*fmts) if fmts[0] is not None else None
        if scheme is not None:
            schemes[name] = scheme
    writers = {lay: [c for c, s in schemes.items() if L.supports(lay, s)] for lay in L.LAYOUTS}
    if schemes and not any(len(w) == len(schemes) for w in writers.values()):
        raise ValueError(f"auto.formats {list(candidates)}: no export layout writes all of them "
                         f"in one model (schemes {schemes}; each layout writes {writers}); "
                         "choose candidates one layout holds together")


def _search_recipe(model, auto, batches, groups, out: Path):
    """Run the search; write ``recipe.yaml`` (rank 0); return (Recipe, summary block)."""
    import yaml

    from megaquant.auto.search import search
    from megaquant.evaluate import run_forward

    cfg, compare = auto
    calib = [b[:, :-1] for b in batches]
    t0 = time.perf_counter()
    result = search(model, cfg, lambda m: run_forward(m, calib, "calibrate", groups.dp_group),
                    batches, dp_group=groups.dp_group, tp_group=groups.tp_group, compare=compare)
    seconds = {**result.seconds, "total": time.perf_counter() - t0}
    path = out / "recipe.yaml"
    text = (f"# Written by megaquant's mixed-precision search (scripts/ptq.py auto.*).\n"
            f"# Reuse: scripts/ptq.py +recipe={path} ; scripts/qat.py model.quantization={path}\n"
            + yaml.safe_dump(result.recipe, sort_keys=False))
    return load_recipe(result.recipe), {"recipe_path": str(path), "recipe_yaml": text,
                                        "seconds": seconds,
                                        **{k: v for k, v in result.recipe["auto"].items()
                                           if k != "groups"},
                                        "groups": result.recipe["auto"]["groups"]}


def render_report(s: dict) -> str:
    """A short human-readable report of a PTQ run."""
    e, w = s["eval"], s["wall_s"]
    lines = [
        f"# PTQ report: {s['model']['name']} with recipe {s['recipe']}",
        "",
        f"- parallel: tp={s['parallel']['tp']} pp={s['parallel']['pp']} ep={s['parallel']['ep']} "
        f"dp={s['parallel']['dp']} (world {s['world_size']}, {s['device']})",
        f"- layers quantized: {len(s['layers_quantized'])} ({s['quantizers_enabled']} quantizers); "
        f"skipped: {', '.join(f'{k} ({v})' for k, v in s['layers_skipped'].items()) or 'none'}",
        f"- calibration tokens: {s['calibration']['tokens']}; "
        f"evaluation tokens: {s['eval_tokens']}",
        "",
        "| | loss | perplexity |",
        "|---|---|---|",
        f"| unquantized | {e['loss_fp']:.4f} | {e['ppl_fp']:.2f} |",
        f"| {s['recipe']} | {e['loss_quant']:.4f} | {e['ppl_quant']:.2f} (x{e['ppl_ratio']:.3f}) |",
        "",
        "wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in w.items()),
    ]
    if "auto" in s:
        lines += _render_auto(s["auto"])
    if s["model"]["source"] == "smollm2":
        lines += ["", "Note: the embedded SmolLM2 weights ship as GGUF Q4_1 (already on a 4-bit "
                  "grid), so weight-quantization error on this model is understated."]
    return "\n".join(lines) + "\n"


def _render_auto(a: dict) -> list[str]:
    lines = ["", f"## Mixed precision: {a['effective_bits']:.3f} effective weight bits (budget "
             f"{a['budget_bits']:g}, candidates {a['formats']}, score {a['score']})", "",
             f"recipe: {a['recipe_path']}", "",
             "| layers | format | bits | " + " | ".join(a["formats"]) + " |",
             "|---|---|---|" + "---|" * len(a["formats"])]
    for g in a["groups"]:
        sc = g["scores"][a["score"]]
        lines.append(f"| {g['modules']} | {g['format']} | {g['bits']:.3f} | "
                     + " | ".join(f"{sc[f]:.3g}" for f in a["formats"]) + " |")
    return lines
