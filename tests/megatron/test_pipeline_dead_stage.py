"""A pipeline stage that dies makes the other stage fail (non-zero exit), never hang.

Two spawned ranks at PP=2 (the tiny model, one layer per stage). Rank 1 (the last stage) exits
abruptly after building its stage, before the evaluation schedule; rank 0 runs the schedule and
must raise, either at once (gloo sees the closed connection) or after the job's collective
timeout (``init_distributed(timeout_s=...)``, 60 s here), and exit non-zero. The parent waits
well past that timeout; a hang fails the test instead of blocking the run.

Under load: the timeout also bounds how far apart the two ranks may be while they set up
(groups, the tied-embedding all-reduce); 60 s leaves room for a loaded 2-core machine (with
20 s, a rank delayed that long would fail outside the schedule, with another exit code).
The rendezvous store is held by the parent (port 0, as in ``tests.distributed_utils``), so no
other process can take the port between choosing and binding it.
"""

import multiprocessing as mp
import os
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

GROUP_TIMEOUT_S = 60


def _rank(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      TORCHELASTIC_USE_AGENT_STORE="True")
    import torch

    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.megatron.pipeline import pipeline_evaluate_loss
    from megaquant.megatron.stages import stage_layout
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.set_num_threads(1)
    init_distributed(timeout_s=GROUP_TIMEOUT_S)
    groups = init_model_parallel(pp=2)
    cfg = tiny_gpt_config(tie_embeddings=True)
    model = build_gpt_model(cfg, stage=stage_layout(cfg.num_layers, 2, groups.pp_rank))
    if rank == 1:
        os._exit(17)  # the last stage dies without a word
    tokens = torch.randint(0, 256, (2, 33))
    try:
        pipeline_evaluate_loss(model, [tokens, tokens], groups)
    except Exception as e:  # noqa: BLE001 - any error is the expected outcome
        print(f"rank 0 raised {type(e).__name__}: {str(e)[:200]}", flush=True)
        os._exit(3)
    os._exit(0)  # returned a loss with half the pipeline missing: wrong


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_dead_last_stage_makes_first_stage_exit_nonzero():
    ctx = mp.get_context("spawn")
    store = TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=300))
    procs = [ctx.Process(target=_rank, args=(r, store.port)) for r in range(2)]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120 + 3 * GROUP_TIMEOUT_S)
        assert not any(p.is_alive() for p in procs), "a stage hung after its peer died"
        assert procs[1].exitcode == 17
        assert procs[0].exitcode == 3, f"first stage exit code {procs[0].exitcode}"
    finally:
        for p in procs:  # only our own children, by handle
            if p.is_alive():
                p.kill()
                p.join(5)
    assert time.monotonic() - start < 120 + 3 * GROUP_TIMEOUT_S
