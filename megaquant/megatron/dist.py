"""Process start-up for megaquant: one call to join the job, one to lay out model parallelism.

Where the job's shape comes from, in order of precedence:

1. torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
2. Slurm ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is the
   first host of ``SLURM_JOB_NODELIST``, the port ``MASTER_PORT`` or one derived from
   ``SLURM_JOB_ID`` so that two jobs sharing a node do not collide);
3. nothing: a single process. We still create a one-rank gloo group on a free local port so
   that code written with collectives (all-reduce of an amax, a DP-mean loss) runs unchanged.

The backend follows the hardware: NCCL when CUDA is available (and the CUDA device is set
from the local rank), gloo otherwise. The collective timeout is the user's ``timeout_s``: if a
rank dies or stops (SIGSTOP, a hung device), the others fail with a timeout error after that
long instead of hanging forever. It reaches every group: the default one here, and Megatron's
TP/DP/PP/EP groups through ``initialize_model_parallel(distributed_timeout_minutes=...)`` (which
otherwise defaults to 30 minutes).

``init_model_parallel`` is the *only* place that asks Megatron's ``parallel_state`` for process
groups; everything below it receives groups explicitly (``ParallelGroups``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT = 29500
_timeout_s: float = 600.0  # the job's collective timeout, set by init_distributed


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process (pure data, parsed from the environment)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, after the default process group exists."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" | "gloo"
    device: torch.device


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as ``node[01-04,07],login1`` into host names.

    Handles the common forms (comma lists, one bracket group per host with ranges and
    zero-padding). Nested or multiple bracket groups per host are rare and rejected loudly.
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", item)
        if match is None:
            if "[" in item or "]" in item:
                raise ValueError(f"cannot parse Slurm nodelist entry {item!r} in {nodelist!r}; "
                                 "set MASTER_ADDR explicitly")
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)  # keep zero-padding: node[01-04] -> node01 .. node04
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from e


def parse_launch_env(env: Mapping[str, str]) -> Optional[LaunchInfo]:
    """Read torchrun's or Slurm's variables; ``None`` means a plain single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env
            else DEFAULT_MASTER_PORT,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("Slurm job without SLURM_JOB_NODELIST: set MASTER_ADDR")
            addr = expand_nodelist(nodelist)[0]
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            # Derive the port from the job id: two jobs on one node must not share a port.
            port = 20000 + _int_env(env, "SLURM_JOB_ID") % 20000
        else:
            port = DEFAULT_MASTER_PORT
        return LaunchInfo(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=_int_env(env, "SLURM_NTASKS"),
            local_rank=_int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
            source="slurm",
        )
    return None


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_group(local_rank: int) -> DistEnv:
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def init_distributed(timeout_s: float = 600) -> DistEnv:
    """Join the job (idempotent) and return where this process stands.

    ``timeout_s`` bounds every collective: a rank that died makes the others raise after that
    many seconds instead of waiting forever.
    """
    global _timeout_s
    if not timeout_s > 0:
        raise ValueError(f"run.timeout_s={timeout_s}: the collective timeout must be > 0 seconds")
    _timeout_s = float(timeout_s)
    info = parse_launch_env(os.environ)
    check_master_port(info)
    local_rank = info.local_rank if info is not None else 0
    if dist.is_initialized():
        return _env_from_group(local_rank)
    if info is None:
        info = LaunchInfo(0, 1, 0, "127.0.0.1", free_port(), "single")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Before the group exists: NCCL binds each rank to the current device.
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return _env_from_group(local_rank)


@contextlib.contextmanager
def explain_timeouts(key: str = "run.timeout_s") -> Iterator[None]:
    """Re-raise a collective timeout (gloo: "Timed out waiting ...ms", NCCL: "Watchdog caught
    collective operation timeout") as an error that says what it means and what to do."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).lower()
        if "timed out" not in text and "timeout" not in text:
            raise
        raise RuntimeError(
            f"a collective waited {key}={_timeout_s:g} s for another rank: one rank died, hung "
            "or was stopped (see its log; the first rank to fail names the cause). If the ranks "
            f"are only slow, raise {key}. ({str(e).splitlines()[0][:300]})") from e


def check_master_port(info: Optional[LaunchInfo]) -> None:
    """Refuse ``MASTER_PORT=0`` with several ranks (``torchrun --master-port=0``): rank 0 would
    listen on a random port the others cannot know, and they would wait minutes, then fail with
    a raw DistNetworkError."""
    if info is not None and info.world_size > 1 and info.master_port == 0:
        raise ValueError(
            "MASTER_PORT=0 (torchrun --master-port=0?): the other ranks cannot find a port rank 0 "
            "picks at random. Give a fixed free port (--master-port=29501) or let torchrun choose "
            "one with --standalone")


@dataclass
class ParallelGroups:
    """Explicit process groups and this rank's coordinates in them.

    Pass these down (``tp_group=groups.tp_group``); never look them up again below this layer.
    ``pg_collection`` is the same groups in Megatron's ``ProcessGroupCollection`` form, for
    Megatron modules that take ``pg_collection=``. Expert groups always exist (size 1 when
    ``ep == 1``) so an MoE layer can be built at any layout; fields typed ``Optional`` are
    ``None`` only where a future layout (e.g. a non-MoE pipeline stage) has no such group.
    """

    tp: int
    pp: int
    ep: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    ep_group: Optional[dist.ProcessGroup]
    expt_tp_group: Optional[dist.ProcessGroup]
    expt_dp_group: Optional[dist.ProcessGroup]
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection


def check_parallel_layout(world_size: int, tp: int, pp: int, ep: int) -> None:
    """Raise a ValueError that says how to fix an impossible layout (pure, testable)."""
    for name, value in (("tensor_parallel", tp), ("pipeline", pp), ("expert_parallel", ep)):
        if value < 1:
            raise ValueError(f"{name} size must be >= 1, got {value}")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel {tp} x pipeline {pp}; "
            f"launch with --nproc-per-node={tp * pp} (or a multiple) or set "
            f"parallel.tp/parallel.pp so that tp*pp divides {world_size}")
    # Megatron lays experts out as expert_tensor (= tp here) x expert_parallel x pipeline.
    if world_size % (ep * tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by expert_parallel {ep} x tensor_parallel "
            f"{tp} x pipeline {pp}; launch with a multiple of {ep * tp * pp} processes or lower "
            "parallel.ep")


def init_model_parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234) -> ParallelGroups:
    """Lay out tensor/pipeline/expert parallelism with Megatron and seed the RNGs.

    Call after ``init_distributed``; every group gets its ``timeout_s``. On a machine without
    CUDA this also turns on the CPU runtime (``megaquant.megatron.cpu.device.enable_cpu_runtime``)
    and seeds a CPU RNG tracker
    in place of Megatron's CUDA one.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megaquant.megatron.cpu.device import enable_cpu_runtime
    from megaquant.megatron.cpu.rng import cpu_model_parallel_manual_seed

    if not dist.is_initialized():
        raise RuntimeError("call megaquant.megatron.dist.init_distributed() before "
                           "init_model_parallel()")
    check_parallel_layout(dist.get_world_size(), tp, pp, ep)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        # minutes as a float: timedelta(minutes=0.5) is 30 s; every TP/DP/EP group gets it
        distributed_timeout_minutes=_timeout_s / 60,
    )
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)  # same on all ranks: CPU-initialised weights must agree
        model_parallel_cuda_manual_seed(seed)
    else:
        enable_cpu_runtime()
        cpu_model_parallel_manual_seed(seed, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=etp_rank)
    return ParallelGroups(
        tp=tp, pp=pp, ep=ep, dp=ps.get_data_parallel_world_size(),
        tp_rank=tp_rank, pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), ep_rank=ep_rank,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        expt_tp_group=ps.get_expert_tensor_parallel_group(),
        expt_dp_group=ps.get_expert_data_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
