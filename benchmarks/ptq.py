"""PTQ benchmark on the embedded SmolLM2-135M (single process): overhead and accuracy per recipe.

1. Calibration overhead: the same forward with quantizers off and in calibrate mode (median of
   several runs, side by side in one process). Target ratio <= 1.3.
2. For each recipe: calibrate, then evaluation perplexity against the unquantized model, and the
   time each step took.

Prints a table and appends it to benchmarks/RESULTS.md with the date and machine.

    python benchmarks/ptq.py                      # all recipes, 4 x 512 calibration tokens
    python benchmarks/ptq.py --recipes nvfp4 fp8 --eval-samples 4
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from megaquant.data import default_calib_text, default_eval_text, token_batches
from megaquant.evaluate import evaluate_loss, run_forward
from megaquant.megatron.dist import init_distributed, init_model_parallel
from megaquant.models.gpt import GPTConfig, build_gpt_model
from megaquant.models.mapping import hf_to_megatron
from megaquant.models.smollm2 import load_smollm2
from megaquant.ptq import quantize, restore
from megaquant.quantizer import disable_quantizers, enable_quantizers, iter_quantizers
from megaquant.recipe import available_recipes, load_recipe
from megaquant.spec import get_spec_provider

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _model(arch: GPTConfig, hf_state):
    model = build_gpt_model(arch, get_spec_provider("local"), tp_size=1)
    model.load_state_dict(hf_to_megatron(hf_state, arch, 0, 1), strict=False)
    return model.eval()


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def calibration_overhead(arch, hf_state, batch, repeats: int) -> tuple[float, float]:
    """(seconds off, seconds calibrating) for one forward of ``batch``."""
    model = _model(arch, hf_state)
    restore(model, "nvfp4")  # quantizers configured, not calibrated
    fwd = lambda: run_forward(model, [batch], "bench", None)  # noqa: E731
    modes = disable_quantizers(model)
    t_off = _median_time(fwd, repeats)
    for _, q in iter_quantizers(model):
        if q.fmt is not None:
            q.configure(q.fmt, "calibrate")
    t_cal = _median_time(fwd, repeats)
    enable_quantizers(model, modes)
    return t_off, t_cal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Default: the round-to-nearest recipes (max calibration); benchmarks/calib.py covers the
    # calibration algorithms, which take far longer.
    rtn = [r for r in available_recipes() if load_recipe(r).calib.algorithm == "max"]
    p.add_argument("--recipes", nargs="*", default=rtn)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    init_distributed()
    groups = init_model_parallel(1)
    arch_d, hf_state, tok = load_smollm2()
    arch = GPTConfig.from_dict({**arch_d, "seq_length": args.seq, "name": "SmolLM2-135M"})
    calib = [t[None, :-1]
             for t in token_batches(default_calib_text(), tok, args.calib_samples, args.seq)]
    evals = list(token_batches(default_eval_text(), tok, args.eval_samples, args.seq).split(1))

    t_off, t_cal = calibration_overhead(arch, hf_state, calib[0], args.repeats)
    rows = []
    t = time.perf_counter()
    base = evaluate_loss(_model(arch, hf_state), evals, groups.dp_group)
    rows.append(("fp32 (unquantized)", math.exp(base), 1.0, 0.0, time.perf_counter() - t))
    for name in args.recipes:
        model = _model(arch, hf_state)
        t = time.perf_counter()
        quantize(model, name, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                           dp_group=groups.dp_group)
        t_q = time.perf_counter() - t
        t = time.perf_counter()
        ppl = math.exp(evaluate_loss(model, evals, groups.dp_group))
        rows.append((name, ppl, ppl / math.exp(base), t_q, time.perf_counter() - t))
        print(f"{name}: ppl {ppl:.2f}", flush=True)
    report(args, t_off, t_cal, rows)


def report(args, t_off: float, t_cal: float, rows) -> None:
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}")
    lines = [
        f"## benchmarks/ptq.py: SmolLM2-135M, {machine}",
        "",
        f"Calibration forward (1 x {args.seq} tokens, median of {args.repeats}): quantizers off "
        f"{t_off:.3f} s, calibrating {t_cal:.3f} s, ratio {t_cal / t_off:.2f} (target <= 1.3)",
        "",
        f"Perplexity on {args.eval_samples} x {args.seq} tokens of Hamlet; calibration "
        f"{args.calib_samples} x {args.seq} tokens of other plays (max calibration, RTN).",
        "",
        "| recipe | perplexity | x fp32 | quantize+calibrate s | eval s |",
        "|---|---|---|---|---|",
        *[f"| {n} | {p:.2f} | {r:.3f} | {tq:.1f} | {te:.1f} |" for n, p, r, tq, te in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(RESULTS, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
