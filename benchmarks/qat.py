"""QAT benchmark: one training step with quantizers on vs off, same model, same run.

Reports, per recipe, the step-time ratio (target <= 1.5) and the peak-memory ratio (target
<= 1.15) of a full training step (forward, backward, AdamW update) against the same step with
every quantizer off, plus the same numbers with the recompute hook of ``megaquant.nn.local``
disabled (``keep-copy``: what saving the fake-quantized weight for backward costs).

Model: the SmolLM2-135M architecture (random weights, ``--layers`` of its 30 decoder layers;
the tied 49152-token embedding is kept, and is not quantized) at ``--seq`` tokens, one
sequence per step, fp32, one process.

How memory is measured: each mode runs in a fresh process. On GPU, ``torch.cuda`` peak
allocated bytes over the measured steps. On CPU, glibc is told to serve every allocation over
64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the OS and the
process's resident-set high-water mark (``ru_maxrss``) is the peak of live memory; the
interpreter's own footprint (RSS before the model exists) is subtracted. Step time: median
of ``--steps`` steps after one warm-up step, in the same process.

    python benchmarks/qat.py                        # nvfp4 and int4_w4a16, 30 layers
    python benchmarks/qat.py --layers 8 --recipes nvfp4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(mode: str, recipe: str, layers: int, seq: int, groups):
    """(model, optimizer, step context, the mode's patch context) for one mode."""
    import contextlib
    from unittest import mock

    import torch

    import megaquant
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.models.smollm2 import SMOLLM2_135M
    from megaquant.spec import get_spec_provider
    from megaquant.train.config import BatchConfig, OptimConfig
    from megaquant.train.optim import build_optimizer
    from megaquant.train.step import StepContext

    arch = GPTConfig.from_dict({**SMOLLM2_135M, "num_layers": layers, "seq_length": seq})
    torch.manual_seed(0)
    model = build_gpt_model(arch, get_spec_provider("local"), tp_size=1)
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, arch.vocab_size, (8, seq + 1), generator=g)
    if mode != "off":
        calib = [windows[:1, :-1]]
        megaquant.quantize(model, recipe, lambda m: [m(t, None, None) for t in calib])
    if mode.startswith("lsq"):  # learnable scales: global amax (+ per-block weight amax)
        from megaquant.train.config import LearnableScalesConfig
        from megaquant.train.learnable import enable_learnable_scales

        enable_learnable_scales(model, LearnableScalesConfig(
            enabled=True, per_block=mode == "lsq-block" or "int4" in recipe))
    keep = mock.patch("megaquant.nn.local._recompute_saved_weight",
                      lambda *a: contextlib.nullcontext()) if mode == "keep-copy" \
        else contextlib.nullcontext()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5))
    ctx = StepContext(windows, BatchConfig(1, 1), groups.dp_group, groups.tp_group,
                      grad_clip=1.0)
    return model, optimizer, ctx, keep


def _timed_step(case, step: int) -> float:
    import torch

    from megaquant.train.step import train_step

    model, optimizer, ctx, keep = case
    t0 = time.perf_counter()
    with keep:
        train_step(model, optimizer, step, 1e-5, ctx)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def child(mode: str, recipe: str, layers: int, seq: int, steps: int) -> dict:
    """Run in a fresh process: build, (quantize), time ``steps`` training steps, measure peak."""
    import torch

    base_rss = _rss_mib()
    import megaquant  # noqa: F401
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed()
    groups = init_model_parallel(1)
    base_rss = max(base_rss, _rss_mib())  # after imports and process groups, before the model
    case = _build(mode, recipe, layers, seq, groups)
    cuda = torch.cuda.is_available()
    times = []
    for step in range(steps + 1):
        if cuda and step == 1:
            torch.cuda.reset_peak_memory_stats()
        times.append(_timed_step(case, step))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"step_s": statistics.median(times[1:]), "peak_mib": peak}


def child_side_by_side(modes: list[str], recipe: str, layers: int, seq: int,
                       steps: int) -> dict:
    """All modes in one process, their steps interleaved (off, on, lsq, off, on, lsq, ...).

    On a shared machine whose load drifts, separate processes measured minutes apart compare
    different machines; interleaving gives every mode the same load. Medians of ``steps``
    steps after two warm-ups (the first compiles the kernels). No memory figure (one process).
    """
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed()
    groups = init_model_parallel(1)
    cases = {m: _build(m, recipe, layers, seq, groups) for m in modes}
    times = {m: [] for m in modes}
    for step in range(steps + 2):
        for m in modes:
            times[m].append(_timed_step(cases[m], step))
    return {m: {"step_s": statistics.median(t[2:]), "all_s": t, "peak_mib": float("nan")}
            for m, t in times.items()}


def run_child(mode: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", mode, "--recipes", args.recipe_now,
           "--layers", str(args.layers), "--seq", str(args.seq), "--steps", str(args.steps),
           "--modes", *args.modes]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=["nvfp4", "int4_w4a16"])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--modes", nargs="+", default=["on", "keep-copy"],
                   choices=["on", "keep-copy", "lsq", "lsq-block"],
                   help="lsq / lsq-block: learnable global (and per-block weight) scales")
    p.add_argument("--side-by-side", action="store_true",
                   help="all modes in one process, steps interleaved (time only)")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "side-by-side":
            out = child_side_by_side(["off", *args.modes], args.recipes[0], args.layers,
                                     args.seq, args.steps)
        else:
            out = child(args.child, args.recipes[0], args.layers, args.seq, args.steps)
        print(json.dumps(out))
        return
    rows = []
    for recipe in args.recipes:
        args.recipe_now = recipe
        if args.side_by_side:
            res = run_child("side-by-side", args)
            print({m: [round(t, 2) for t in r["all_s"]] for m, r in res.items()}, flush=True)
        else:
            res = {mode: run_child(mode, args) for mode in ("off", *args.modes)}
        off = res["off"]
        for mode in args.modes:
            r = res[mode]
            vs_on = f" ({r['step_s'] / res['on']['step_s']:.2f}x on)" \
                if mode.startswith("lsq") and "on" in res else ""
            rows.append(f"| {recipe} | {mode}{vs_on} | {off['step_s']:.2f} | {r['step_s']:.2f} | "
                        f"{r['step_s'] / off['step_s']:.3f} | {off['peak_mib']:.0f} | "
                        f"{r['peak_mib']:.0f} | {r['peak_mib'] / off['peak_mib']:.3f} |")
    table = _table(args, rows)
    print(table)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + table)


def _table(args, rows) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU {platform.machine()}, nproc {os.cpu_count()}, threads {args.threads}"
    head = [f"## QAT training step, quantizers on vs off — {time.strftime('%c %Z')}", "",
            f"machine: {device}, torch {torch.__version__}; model: SmolLM2-135M architecture, "
            f"{args.layers} layers, random weights, seq {args.seq}, 1 sequence per step, fp32, "
            f"AdamW; median of {args.steps} steps after "
            + ("2 warm-ups; all modes in one process, steps interleaved; load average "
               f"{os.getloadavg()[0]:.1f} at the end" if args.side_by_side
               else "1 warm-up; each mode in a fresh process"),
            "", "| recipe | quantizers | off s/step | s/step | time ratio (<= 1.5) | "
            "off peak MiB | peak MiB | memory ratio (<= 1.15) |",
            "|---|---|---|---|---|---|---|---|"]
    foot = ["", "`on`: megaquant as shipped (the fake-quantized weight is recomputed in backward, "
            "not saved). `keep-copy`: the recompute hook disabled, for comparison. `lsq`/"
            "`lsq-block`: learnable global (and per-block weight) scales. Peak memory: "
            "CUDA peak allocated on GPU; on CPU the resident-set high-water mark above the "
            "interpreter's footprint, with glibc returning every allocation over 64 KiB."]
    return "\n".join(head + rows + foot) + "\n"


if __name__ == "__main__":
    main()
