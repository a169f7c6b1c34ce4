"""Benchmark: fake-quantize a [4096, 4096] float32 tensor with every format.

Times the compiled fast path (its shape-generic kernel) (MEGAQUANT_KERNEL=compiled) and the
eager reference, median of several runs after warm-up, against ``x.clone()`` of the same tensor
timed alternately with each case (the memory-bandwidth reference: one read + one write;
alternating keeps the ratio honest on a machine shared with other jobs). Checks compiled ==
eager bit-exactly on the way. Mode "ste" is the QAT forward: static amax, ``x`` requiring grad,
so the kernel also writes the straight-through keep mask.
Prints a table and appends it, with date, machine and load average, to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/formats.py [--size 4096] [--runs 7] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from megaquant.formats import get_format

# (format, mode): "static" passes a calibrated amax (the PTQ/QAT hot path), "dynamic" computes it
# from x, "block" formats take every scale from the data, "ste" is "static" with x requiring grad
# (the QAT forward: the kernel also writes the keep mask).
CASES = [("fp8", "static"), ("fp8", "dynamic"), ("fp8", "ste"), ("nvfp4", "static"),
         ("nvfp4", "dynamic"), ("nvfp4", "ste"), ("mxfp8", "block"), ("mxfp4", "block"),
         ("int8", "static"), ("int4", "block")]


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def paired_ms(fn, ref, runs: int) -> tuple[float, float]:
    """Medians of ``fn`` and ``ref`` timed alternately, so load drift on a shared machine hits
    both."""
    fn(), ref()
    a, b = [], []
    for _ in range(runs):
        a.append(median_ms(fn, 1, warmup=0))
        b.append(median_ms(ref, 1, warmup=0))
    return statistics.median(a), statistics.median(b)


def run_case(x, name, mode, kernel, runs):
    """(fake-quant ms, clone ms timed alternately with it, output)."""
    fmt = get_format(name)
    amax = fmt.compute_amax(x) if mode in ("static", "ste") else None
    if mode == "ste":
        x = x.detach().requires_grad_(True)
    os.environ["MEGAQUANT_KERNEL"] = kernel
    if kernel == "compiled":
        # a first call on another shape, so that the timed kernel is the shape-generic one a run
        # over many layer shapes uses (FP8/INT: automatic dynamic shapes recompile it; NVFP4/MX
        # compile one flat [rows, block] kernel with dynamic rows from the start)
        small = x.detach()[:64, :256].contiguous().requires_grad_(x.requires_grad)
        fmt.fake_quantize(small, fmt.compute_amax(small) if amax is not None else None)
    ms, clone_ms = paired_ms(lambda: fmt.fake_quantize(x, amax), lambda: x.detach().clone(), runs)
    return ms, clone_ms, fmt.fake_quantize(x, amax).detach()


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in avg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--eager-runs", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size) * 2.0
    gb = x.numel() * x.element_size() / 1e9
    clone_ms = median_ms(lambda: x.clone(), args.runs)
    rows = [("clone", "-", "-", clone_ms, gb / clone_ms * 1e3, 1.0, "")]
    for name, mode in CASES:
        fast_ms, fast_clone, fast = run_case(x, name, mode, "compiled", args.runs)
        eager_ms, eager_clone, ref = run_case(x, name, mode, "eager", args.eager_runs)
        same = torch.equal(fast.view(torch.int32), ref.view(torch.int32))
        for kernel, ms, cl in (("compiled", fast_ms, fast_clone), ("eager", eager_ms, eager_clone)):
            rows.append((name, mode, kernel, ms, gb / ms * 1e3, cl / ms,
                         ("bit-exact" if same else "MISMATCH") if kernel == "compiled" else ""))
    lines = ["| format | mode | kernel | ms | GB/s (input) | x clone | compiled == eager |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.3f} | {r[6]} |"
              for r in rows]
    lines.append("\n'x clone' = median clone time / median fake-quant time, the two timed "
                 "alternately "
                 "in the same loop (the first row is a plain clone median for reference).")
    table = "\n".join(lines)
    print(table)
    print(f"load average (1/5/15 min): {_load(load_before)} at the start, "
          f"{_load(os.getloadavg())} at the end")
    if not args.no_append:
        header = (f"\n## formats fake-quant, [{args.size}, {args.size}] float32 — "
                  f"{datetime.datetime.now(datetime.timezone.utc):%a %b %d %H:%M:%S UTC %Y}\n\n"
                  f"machine: {platform.machine()}, nproc {os.cpu_count()}, "
                  f"torch {torch.__version__}, "
                  f"threads {torch.get_num_threads()}, median of {args.runs} "
                  f"(eager {args.eager_runs}) "
                  f"after 2 warm-up runs; load average (1/5/15 min) {_load(load_before)} at "
                  f"the start, {_load(os.getloadavg())} at the end (2 cores: above ~2 the "
                  "machine is shared and absolute times are inflated; compare ratios within "
                  "this table)\n\n")
        path = Path(__file__).with_name("RESULTS.md")
        with path.open("a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
