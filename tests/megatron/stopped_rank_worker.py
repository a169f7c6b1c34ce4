"""One rank of the stopped-rank test (run as ``python stopped_rank_worker.py``, torchrun's env).

Both ranks join with ``timeout_s`` from argv and lay out tp=1, ep=2 (so dp=2, ep=2). Rank 1 then
stops itself (SIGSTOP: alive but silent, like a hung device); rank 0 prints the timeout every
Megatron group got, then all-reduces over the data-parallel group and must fail, not hang.
"""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megaquant.megatron.dist import explain_timeouts, init_distributed, init_model_parallel

init_distributed(timeout_s=float(sys.argv[1]))
groups = init_model_parallel(tp=1, pp=1, ep=2)
dist.barrier()
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
    sys.exit(0)

named = {n: getattr(groups, n) for n in ("tp_group", "dp_group", "ep_group", "expt_dp_group")}
named["dp_gloo"] = ps.get_data_parallel_group_gloo()
for name, pg in named.items():
    print(f"timeout {name} {pg._get_backend(torch.device('cpu')).options._timeout.total_seconds()}",
          flush=True)
start = time.monotonic()
try:
    with explain_timeouts():
        dist.all_reduce(torch.ones(4), group=groups.dp_group)
except Exception as e:  # noqa: BLE001 - report what a user would see
    print(f"failed after {time.monotonic() - start:.1f} s: {type(e).__name__}: "
          f"{str(e).splitlines()[0][:400]}", flush=True)
    sys.exit(3)
print("all_reduce returned", flush=True)
