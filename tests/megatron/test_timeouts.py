"""``run.timeout_s`` reaches every process group: a stopped rank ends the job instead of hanging.

Before, Megatron's TP/DP/EP groups got its 30-minute default whatever ``run.timeout_s`` said, and
one SIGSTOPped rank held its peer for more than 7 minutes. Reference: the default group's timeout
(what ``init_distributed`` was given).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_utils import free_port

WORKER = Path(__file__).with_name("stopped_rank_worker.py")


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_stopped_rank_fails_its_peer_within_the_timeout():
    timeout_s = 8
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(timeout_s)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        # Start-up (Megatron import) takes ~10-40 s on a loaded 2-core box; a group left at the
        # 30-minute default would blow through this bound.
        out, _ = procs[0].communicate(timeout=300)
    finally:
        for p in procs:  # our own children; SIGKILL also ends a stopped process
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert procs[0].returncode == 3, out[-3000:]
    timeouts = {line.split()[1]: float(line.split()[2]) for line in out.splitlines()
                if line.startswith("timeout ")}
    assert set(timeouts) == {"tp_group", "dp_group", "ep_group", "expt_dp_group", "dp_gloo"}
    assert all(t == timeout_s for t in timeouts.values()), timeouts
    assert "a collective waited run.timeout_s=8 s for another rank" in out, out[-2000:]


def test_master_port_zero_is_refused_with_the_fix():
    from megaquant.megatron.dist import check_master_port, parse_launch_env

    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    with pytest.raises(ValueError, match=r"MASTER_PORT=0.*--master-port=29501.*--standalone"):
        check_master_port(parse_launch_env(env))
    check_master_port(parse_launch_env({**env, "WORLD_SIZE": "1"}))  # one rank: fine
    check_master_port(parse_launch_env({**env, "MASTER_PORT": "29511"}))
