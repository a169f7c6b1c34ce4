"""Run a function on N local ranks (gloo, spawned processes) and collect what each returns.

    from tests.distributed_utils import run_ranks

    def _work(tp):                      # module-level: spawned children import it by name
        env = init_distributed(timeout_s=60)
        groups = init_model_parallel(tp=tp)
        ...
        return {"loss": 1.23}           # picklable (tensors are fine)

    results = run_ranks(_work, world_size=2, args=(2,), timeout_s=120)   # [rank0, rank1]

Each child gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
so ``megaquant.megatron.dist.init_distributed`` joins as under torchrun, and one intra-op
thread (the CI box has 2 cores for everything).

Ports, without a race: a port found free and then closed (``free_port``) can be taken by any
other process before the job binds it (gloo's many connections and listening sockets draw from
the same ephemeral range, and several test runs share the machine), and the job then fails
with EADDRINUSE or, worse, a rank joins another job's store. So nothing here picks a port to
bind later: ``run_ranks`` binds the rendezvous store itself (port 0, the OS chooses) and keeps
it open while the ranks run, as torchrun's agent does (the children join it as clients:
``TORCHELASTIC_USE_AGENT_STORE``), and ``run_script`` starts torchrun with ``--standalone``
(its agent binds port 0 the same way and hands the workers that store). The parent waits at most
``timeout_s``: a hung or crashed rank kills all ranks and raises, with the failing rank's
traceback, instead of blocking the test run. Children tear their process groups down.

``run_script("ptq.py", args, nproc=2)`` runs one of ``scripts/`` as a user would: plain python
for one process, ``torchrun`` for more.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp
from torch.distributed import TCPStore

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, args: Sequence[str], nproc: int = 1, timeout: float = 400
               ) -> subprocess.CompletedProcess:
    """Run ``scripts/<script> *args`` from the repo root; stdout/stderr captured as text.

    More than one process goes through ``torchrun --standalone`` (see the module docstring;
    ``--master-port=0`` would hand the workers MASTER_PORT=0, which the jobs refuse).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, f"scripts/{script}", *args]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _child(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      TORCHELASTIC_USE_AGENT_STORE="True")  # the parent's store, as a client
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle bytes, not torch's shared-memory tensor passing: the child may exit
        # before the parent reads the queue.
        out.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - report everything, the parent decides
        out.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            parallel_state = sys.modules.get("megatron.core.parallel_state")
            if parallel_state is not None:  # only if the worker used Megatron
                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, args: Sequence = (), timeout_s: float = 120
              ) -> list[Any]:
    """Spawn ``world_size`` ranks running ``fn(*args)``; return their results in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    # A fresh store per call (a reused one would hand the ranks the last run's gloo addresses).
    store = TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout_s))
    procs = [ctx.Process(target=_child, args=(r, world_size, store.port, fn, args, out),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} did "
                                   f"not finish within {timeout_s} s")
            try:
                rank, ok, value = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code "
                                       f"{procs[dead[0]].exitcode} before reporting")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # only our own children, by handle
            if p.is_alive():
                p.kill()
                p.join(5)
    return [results[r] for r in range(world_size)]
