"""Peak memory of PTQ per rank at PP=1 vs PP=2 (2 ranks each; PP=1 means DP=2).

Each layout runs ``megaquant.jobs.ptq.run`` under torchrun (this file with ``--worker``). Per rank
it reports the bytes of the model it holds (parameters and buffers of its stage) and the growth
of the process's peak memory from just before the job (GPU: ``torch.cuda.max_memory_allocated``;
CPU: resident-set high-water mark ``ru_maxrss`` minus the resident set after imports). Prints a
table and appends it to benchmarks/RESULTS.md.

    python benchmarks/ptq_pipeline_memory.py                         # SmolLM2-135M
    python benchmarks/ptq_pipeline_memory.py --model tiny            # seconds, for a smoke run

Evaluation and calibration run under ``torch.no_grad`` at every PP size (no autograd graph, no
dequantized weight copies kept). Note: the loaders still read the whole source model on every
rank (HF / GGUF weights are mapped for the whole model, then each stage keeps its share), so the
peak includes one full copy of the source weights at any PP size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _worker(overrides: list[str]) -> None:
    import resource

    import torch
    from hydra import compose, initialize_config_dir

    from megaquant.jobs.hydra import register_recipes
    from megaquant.jobs.ptq import run

    register_recipes()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("ptq", overrides=overrides)
    cuda = torch.cuda.is_available()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    captured = {}
    import megaquant.jobs.ptq as job

    original = job.build_model

    def build_and_measure(*args, **kwargs):
        model = original(*args, **kwargs)
        captured["model_mib"] = sum(t.numel() * t.element_size() for t in
                                    [*model.parameters(), *model.buffers()]) / 2**20
        return model

    job.build_model = build_and_measure
    summary = run(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    rank = int(os.environ.get("RANK", 0))
    print("MEMORY " + json.dumps({"rank": rank, "pp": summary["parallel"]["pp"],
                                  "model_mib": captured["model_mib"], "peak_mib": peak,
                                  "loss_quant": summary["eval"]["loss_quant"],
                                  "device": "GPU" if cuda else "CPU"}), flush=True)


def _layout(pp: int, model: str, recipe: str, out: Path) -> list[dict]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
            f"--master-port={29000 + pp * 17 + os.getpid() % 500}", __file__, "--worker",
            f"+recipe={recipe}", f"model={model}", f"parallel.pp={pp}", "data.calib_samples=4",
            "data.eval_samples=4", f"run.output_dir={out / f'pp{pp}'}",
            "run.save_checkpoint=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    rows = [json.loads(m) for m in re.findall(r"^MEMORY (.*)$", res.stdout, re.M)]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipe", default="nvfp4")
    args, rest = ap.parse_known_args()
    if args.worker:
        _worker(rest)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for pp in (1, 2) for r in _layout(pp, args.model, args.recipe, Path(tmp))]
    lines = [f"### PTQ peak memory per rank, PP=1 vs PP=2 ({args.model}, {args.recipe}, "
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{rows[0]['device']})", "",
             "| PP | rank | model on the rank (MiB) | peak growth (MiB) | loss after PTQ |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['pp']} | {r['rank']} | {r['model_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['loss_quant']:.4f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    with RESULTS.open("a") as f:
        f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
