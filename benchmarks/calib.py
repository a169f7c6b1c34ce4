"""Calibration algorithms on the embedded SmolLM2-135M: RTN (max) against each applicable one.

For each (recipe, algorithm): quantize a fresh model (calibration on Shakespeare plays other than
Hamlet), then perplexity on Hamlet, against the unquantized model, and the time the whole
``megaquant.quantize`` call took (algorithm + max calibration). Single process; prints a table
and appends it to benchmarks/RESULTS.md with the date and machine.

    python benchmarks/calib.py                                   # the default matrix
    python benchmarks/calib.py --only nvfp4:gptq int8:smoothquant --eval-samples 4
    python benchmarks/calib.py --only nvfp4:smoothquant+gptq int8_sq:recipe   # a chain; a
                                                     # built-in recipe with its own calib section
    python benchmarks/calib.py --tp 3 --only int8:smoothquant    # under torchrun, TP=3 check
    python benchmarks/calib.py --only "int8:[rotate_residual, {algorithm: smoothquant, alpha: 0.8}]"
                                                     # a YAML calib section, options included

Under ``torchrun --nproc-per-node=3 ... --tp 3`` the same numbers come out at TP=3 (the
algorithms' parallel rules make them match TP=1 within float rounding).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megaquant.data import default_calib_text, default_eval_text, token_batches
from megaquant.evaluate import evaluate_loss, run_forward
from megaquant.megatron.dist import init_distributed, init_model_parallel
from megaquant.models.gpt import GPTConfig, build_gpt_model
from megaquant.models.mapping import hf_to_megatron
from megaquant.models.smollm2 import load_smollm2
from megaquant.ptq import quantize
from megaquant.spec import get_spec_provider

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MATRIX = {  # recipe -> calibrations compared (the first is RTN with max calibration)
    "nvfp4": ["max", "mse", "gptq", "smoothquant+gptq"],
    "nvfp4_w4a16": ["max", "awq", "gptq"],
    "int4_w4a16": ["max", "awq", "gptq", "awq+gptq"],
    "int8": ["max", "smoothquant"],
    "int8_sq": ["recipe"],
    "mxfp4": ["max", "gptq", "smoothquant+gptq"],
    "fp8": ["max"],
}


def calib_spec(algo: str):
    """``"a+b"`` -> a chain of algorithms with default options; ``"recipe"`` -> the recipe's own
    ``calib:`` section (None); ``"[...]"`` or ``"{...}"`` -> a YAML calib section (options
    included); anything else -> one algorithm's name."""
    if algo == "recipe":
        return None
    if algo[:1] in "[{":
        spec = yaml.safe_load(algo)
        return [{"algorithm": s} if isinstance(s, str) else s for s in spec] \
            if isinstance(spec, list) else spec
    return algo.split("+") if "+" in algo else algo


def _model(arch: GPTConfig, hf_state, groups, tp: int):
    model = build_gpt_model(arch, get_spec_provider("local"), tp_size=tp)
    model.load_state_dict(hf_to_megatron(hf_state, arch, groups.tp_rank, tp), strict=False)
    return model.eval()


def _runs(only: list[str] | None) -> list[tuple[str, str]]:
    if only:
        return [tuple(x.split(":", 1)) for x in only]
    return [(r, a) for r, algos in MATRIX.items() for a in algos]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="recipe:algorithm pairs (default: the whole matrix)")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()

    init_distributed()
    groups = init_model_parallel(args.tp)
    arch_d, hf_state, tok = load_smollm2()
    arch = GPTConfig.from_dict({**arch_d, "seq_length": args.seq, "name": "SmolLM2-135M"})
    calib = [t[None, :-1]
             for t in token_batches(default_calib_text(), tok, args.calib_samples, args.seq)]
    evals = list(token_batches(default_eval_text(), tok, args.eval_samples, args.seq).split(1))
    loop = lambda m: run_forward(m, calib, "calib", groups.dp_group)  # noqa: E731

    base = math.exp(evaluate_loss(_model(arch, hf_state, groups, args.tp), evals, groups.dp_group))
    rows = [("fp32 (unquantized)", "-", base, 1.0, 0.0)]
    for recipe, algo in _runs(args.only):
        model = _model(arch, hf_state, groups, args.tp)
        t = time.perf_counter()
        quantize(model, recipe, loop, dp_group=groups.dp_group, calib=calib_spec(algo))
        t_q = time.perf_counter() - t
        ppl = math.exp(evaluate_loss(model, evals, groups.dp_group))
        rows.append((recipe, algo, ppl, ppl / base, t_q))
        if _rank0():
            print(f"{recipe} {algo}: ppl {ppl:.3f} (x{ppl / base:.3f}), quantize {t_q:.1f} s",
                  flush=True)
    if _rank0():
        report(args, rows)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def report(args, rows) -> None:
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"threads {torch.get_num_threads()}, TP={args.tp}, "
               f"{subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}")
    lines = [
        f"## benchmarks/calib.py: SmolLM2-135M, {machine}",
        "",
        f"Perplexity on {args.eval_samples} x {args.seq} tokens of Hamlet; calibration "
        f"{args.calib_samples} x {args.seq} tokens of other plays. 'max' = max calibration with "
        "round-to-nearest; 'quantize s' = the whole megaquant.quantize call (algorithm + max).",
        "",
        "| recipe | algorithm | perplexity | x fp32 | quantize s |",
        "|---|---|---|---|---|",
        *[f"| {r} | {a} | {p:.3f} | {x:.3f} | {t:.1f} |" for r, a, p, x, t in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
