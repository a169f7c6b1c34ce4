"""Honest QAT/QAD benchmark: train on Shakespeare, evaluate on text from another domain.

Why: measured on Hamlet after training on the other plays, 16 QAT steps "recover" 74% (nvfp4)
of the PTQ gap, but fp32 fine-tuned with the same budget gains as much on Hamlet: most of that
is adaptation to Shakespeare, not recovery of quantization error. Here the evaluation text is
**the Python documentation** (``pydoc_data.topics`` of the running interpreter: ~460 k
characters of English technical prose, written to the cache by
:func:`megaquant.demo.ood_text.python_docs_text`; neither Shakespeare nor any training text),
and every budget also runs the **fp32 control**: the unquantized model fine-tuned with the same
steps, data and learning rate. Its change on the evaluation text is the domain-adaptation
effect, visible next to the recovery figures.

Per recipe and mode it runs ``scripts/qat.py`` once (one process, fresh output directory) for
the largest budget and evaluates at every requested budget on the way
(``trainer.val_check_interval`` = the gcd of the budgets): the 16-step point of ``--steps 16
64`` is step 16 of the 64-step schedule (lr not yet decayed), not a separate 16-step run. Modes:
``fp32`` (model.quantization=null), ``qat``, ``qad`` and, with ``--lsq``, ``qat+lsq`` /
``qad+lsq`` (learnable scales: global amax + per-block weight amax). Settings: 2 x 256 tokens
a step, AdamW lr 5e-5 (2 warm-up steps, cosine to 5e-6), clipping 1.0, 8 x 256 evaluation
tokens. "Recovered" = (ppl_PTQ - ppl_trained) / (ppl_PTQ - ppl_fp32), the fp32 of the
untrained model; the same with losses is in brackets. "wall s" = set-up (build, calibration,
the fp32 and PTQ evaluations) + the training seconds up to that step (evaluations excluded).
``--jobs 2`` runs two configurations at a time (the wall times then share the machine).

    python benchmarks/qat_ood.py --recipes nvfp4 int4_w4a16 --steps 16 64
    python benchmarks/qat_ood.py --model tiny --steps 2 --recipes nvfp4   # smoke run

Appends a table to benchmarks/RESULTS.md (``--no-append``: print only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MODES = {
    "fp32": ["model.quantization=null"],
    "qat": [],
    "qad": ["model.distill.enabled=true"],
    "qat+lsq": ["model.learnable_scales.enabled=true", "model.learnable_scales.per_block=true"],
    "qad+lsq": ["model.distill.enabled=true", "model.learnable_scales.enabled=true",
                "model.learnable_scales.per_block=true"],
}


def run_one(model: str, recipe: str, mode: str, steps: list[int], eval_text: Path, out: Path,
            seq: int, lr: float) -> dict:
    """One scripts/qat.py run to ``max(steps)``, evaluated at each of ``steps``; its summary."""
    every = math.gcd(*steps)
    args = [f"model={model}", f"model.seq_length={seq}", f"trainer.max_steps={max(steps)}",
            f"trainer.val_check_interval={every}",
            "model.global_batch_size=2", "model.micro_batch_size=1", f"model.optim.lr={lr}",
            "model.optim.sched.warmup_steps=2", f"model.optim.sched.min_lr={lr / 10}",
            f"data.train_samples={max(32, 2 * max(steps))}", f"data.eval_text={eval_text}",
            "data.eval_samples=8", "trainer.resume=false", f"trainer.log_every_n_steps={every}",
            f"run.output_dir={out}"]
    if mode != "fp32":
        args.append(f"model.quantization={recipe}")
    args += MODES[mode]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "qat.py"), *args], check=True,
                       env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((out / "summary.json").read_text())


def budget_rows(recipe: str, mode: str, steps: list[int], s: dict) -> list[dict]:
    """One table row per requested budget from a run's summary (its ``val`` evaluations)."""
    val = {v["step"]: v for v in s["val"]}
    rows = []
    for k in steps:
        e = dict(s["eval"], loss_trained=val[k]["loss"], ppl_trained=val[k]["ppl"])
        rows.append({"recipe": "-" if mode == "fp32" else recipe, "steps": k, "mode": mode,
                     "eval": e, "wall_s": {"total": s["wall_s"]["setup"] + val[k]["train_s"]}})
    return rows


def recovered(ptq: float, trained: float, fp: float) -> float:
    return 100.0 * (ptq - trained) / (ptq - fp) if ptq != fp else float("nan")


def table(rows: list[dict]) -> str:
    lines = ["| recipe | steps | mode | ppl fp32 | ppl PTQ | ppl trained | recovered | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["eval"]
        fp, ptq, tr = e["ppl_fp"], e["ppl_ptq"], e["ppl_trained"]
        if r["mode"] == "fp32":
            rec = f"control: {100 * (tr - fp) / fp:+.1f}% ppl"
        else:
            lrec = recovered(e["loss_ptq"], e["loss_trained"], e["loss_fp"])
            rec = f"{recovered(ptq, tr, fp):.0f}% ({lrec:.0f}%)"
        lines.append(f"| {r['recipe']} | {r['steps']} | {r['mode']} | {fp:.2f} | {ptq:.2f} | "
                     f"{tr:.2f} | {rec} | {r['wall_s']['total']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipes", nargs="+", default=["nvfp4", "int4_w4a16"])
    ap.add_argument("--steps", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--modes", nargs="+", default=["fp32", "qat", "qad"], choices=list(MODES))
    ap.add_argument("--lsq", action="store_true", help="also qat+lsq and qad+lsq")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--jobs", type=int, default=1, help="configurations run at a time")
    ap.add_argument("--out", type=Path, help="keep each run's directory and log here "
                    "(default: a temporary directory)")
    ap.add_argument("--collect", type=Path, help="only build the table from the runs kept in "
                    "this --out directory (runs started separately, e.g. as memory allowed)")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args()
    from megaquant.demo.ood_text import python_docs_text

    eval_text = python_docs_text()
    modes = a.modes + (["qat+lsq", "qad+lsq"] if a.lsq else [])
    steps = sorted(set(a.steps))
    if a.collect is not None:
        return report(a, eval_text, collect(a.collect, steps), None)
    configs = [("-", "fp32")] if "fp32" in modes else []  # the control ignores the recipe
    configs += [(r, m) for r in a.recipes for m in modes if m != "fp32"]
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="qat_ood_") as tmp, \
            concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        tmp = a.out or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        runs = {(r, m): pool.submit(run_one, a.model, a.recipes[0] if r == "-" else r, m, steps,
                                    eval_text, Path(tmp) / f"{r}_{m}".replace("-", "x"),
                                    a.seq, a.lr)
                for r, m in configs}
        for (r, m), fut in runs.items():
            rows += budget_rows(r, m, steps, fut.result())
            print("\n".join(table(rows[-len(steps):]).splitlines()[2:]), flush=True)
    report(a, eval_text, rows, time.time() - t0)


def collect(out: Path, steps: list[int]) -> list[dict]:
    """Table rows from the ``<recipe>_<mode>/summary.json`` run directories under ``out``."""
    rows = []
    for summary in sorted(out.glob("*/summary.json")):
        recipe, _, mode = summary.parent.name.rpartition("_")
        rows += budget_rows("-" if recipe == "x" else recipe, mode, steps,
                            json.loads(summary.read_text()))
    return rows


def report(a, eval_text: Path, rows: list[dict], wall: float | None) -> None:
    """Print the table (fp32 control first at each budget) and append it to RESULTS.md."""
    order = list(MODES)
    rows.sort(key=lambda r: (r["steps"], r["recipe"] != "-", r["recipe"], order.index(r["mode"])))
    total = "" if wall is None else f"; total wall {wall:.0f} s"
    head = (f"## QAT / QAD out of domain (train: Shakespeare plays, eval: Python docs "
            f"{eval_text.name}) - {time.strftime('%a %b %d %H:%M:%S %Y UTC', time.gmtime())}\n\n"
            f"machine: {platform.machine()}, nproc {os.cpu_count()}, python "
            f"{platform.python_version()}; model {a.model}, {a.seq} tokens x 2 a step, lr "
            f"{a.lr}; " + (f"{a.jobs} run(s) at a time" if wall is not None else
                           f"runs collected from {a.collect}") + ", OMP_NUM_THREADS "
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}{total}; "
            f"load average at the end {os.getloadavg()[0]:.1f}\n\n")
    text = head + table(rows) + "\n"
    print(text)
    if not a.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
    sys.exit(0)
