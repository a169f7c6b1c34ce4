"""A tiny distributed job that the Slurm tests submit through the real sbatch templates.

Each rank joins the job with ``megaquant.megatron.dist.init_distributed`` (which reads Slurm's or
torchrun's variables), all-reduces ``rank + 1`` and all-gathers what it saw, and rank 0 writes
``summary.json`` in ``run.output_dir``. The test checks the sum against ``n (n + 1) / 2``, computed
without any communication, and that the ranks are exactly ``0 .. n-1``.

It takes the same ``key=value`` overrides the templates pass to the real entry points:

* ``run.output_dir=DIR`` (set by the launcher), ``run.timeout_s=S`` (collective timeout);
* ``fail_rank=R``: rank R exits with code 3 before joining the process group, as a rank that
  crashes at start-up would; the others then wait in ``init_process_group`` until the launcher
  kills them (or, without ``--kill-on-bad-exit``, until ``run.timeout_s``: TCP gives them no hint);
* ``hang_rank=R``: rank R sleeps instead of joining the collective, as a stuck rank would.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megaquant.megatron.dist import init_distributed, parse_launch_env

KEYS = {"run.output_dir": str, "run.timeout_s": float, "fail_rank": int, "hang_rank": int}


def parse_overrides(argv: list[str]) -> dict:
    """``key=value`` arguments to a dict, rejecting keys this job does not know."""
    out: dict = {"run.output_dir": ".", "run.timeout_s": 60.0, "fail_rank": -1, "hang_rank": -1}
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"dist_job.py: unknown override {arg!r}; valid keys: {sorted(KEYS)}")
        out[key] = KEYS[key](value)
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    cfg = parse_overrides(argv)
    launch = parse_launch_env(os.environ)
    if launch is not None and launch.rank == cfg["fail_rank"]:
        print(f"rank {launch.rank}: failing on purpose", flush=True)
        return 3
    env = init_distributed(timeout_s=cfg["run.timeout_s"])
    if env.rank == cfg["hang_rank"]:
        print(f"rank {env.rank}: hanging on purpose", flush=True)
        time.sleep(3600)
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    seen = [None] * env.world_size
    mine = {"rank": env.rank, "local_rank": env.local_rank, "host": socket.gethostname(),
            "slurm_procid": os.environ.get("SLURM_PROCID")}
    dist.all_gather_object(seen, mine)
    if env.rank == 0:
        out = Path(cfg["run.output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        summary = {"world_size": env.world_size, "sum": total.item(), "ranks": seen}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
