"""Model-parallel RNG streams on the CPU generator (Megatron keeps ``torch.cuda`` states).

``CPURNGStatesTracker`` is installed as Megatron's tracker object (no function is patched).
Megatron forks "the model-parallel RNG" for dropout inside TP regions (attention dropout, the
embedding dropout under sequence parallelism); ours keeps CPU generator states so those forks
work. ``cpu_model_parallel_manual_seed`` replaces ``model_parallel_cuda_manual_seed`` with the
same stream names and seed offsets.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from megatron.core.tensor_parallel import random as mcore_random


class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Named RNG streams on the CPU generator; replaces Megatron's ``CudaRNGStatesTracker``.

    ``fork(name)`` swaps the process's CPU generator state for the named stream, runs the
    block, saves the advanced stream and restores the caller's state, so dropout under TP
    differs between TP ranks without disturbing the default (replicated) stream.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already used by another RNG stream")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG stream {name!r} was never added; call "
                           "cpu_model_parallel_manual_seed() (init_model_parallel does)")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker() -> CPURNGStatesTracker:
    """Make ``tensor_parallel.get_cuda_rng_tracker()`` return a CPU tracker (idempotent)."""
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, CPURNGStatesTracker):
        tracker = CPURNGStatesTracker()
        # Megatron keeps its tracker in these two module globals; get_cuda_rng_tracker()
        # returns the object as long as the "initialized" flag is set.
        mcore_random._CUDA_RNG_STATE_TRACKER = tracker
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


def cpu_model_parallel_manual_seed(seed: int, *, tp_rank: int, ep_rank: int = 0,
                                   etp_rank: int = 0) -> None:
    """CPU twin of ``model_parallel_cuda_manual_seed`` (same stream names and seed offsets).

    The default generator gets ``seed`` on every rank: CPU-initialised weights are drawn whole
    and then split, so all TP ranks must draw the same numbers.
    """
    torch.manual_seed(seed)
    tracker = install_cpu_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ep_rank + etp_rank)
