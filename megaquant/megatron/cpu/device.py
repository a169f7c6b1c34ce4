"""The CPU runtime's two patches of ``torch.cuda``, each listed here with why.

``torch.cuda.current_device`` -> ``torch.device("cpu")`` (:func:`enable_cpu_runtime`, undone
by :func:`disable_cpu_runtime`; :func:`cpu_runtime` scopes it to a ``with`` block)
    Only installed when CUDA is unavailable, where the original raises "Torch not compiled
    with CUDA enabled" anyway. Megatron allocates with ``device=torch.cuda.current_device()``
    in places a spec cannot reach: ``RotaryEmbedding.get_emb`` moves ``inv_freq`` there on
    first use; ``tensor_parallel/mappings.py`` allocates all-gather / reduce-scatter outputs
    there (sequence parallelism, forward *and backward*); ``dist_checkpointing`` all-reduces a
    failure flag there. Because backward runs outside any forward call, the stand-in must stay
    while a CPU model trains: the jobs enable it once (``init_model_parallel``), library users
    may scope it with ``with cpu_runtime():``. A single stand-in covers all of these and any
    new such call in later releases; patching each Megatron function instead would mean
    copying their bodies.

``torch.cuda.synchronize`` -> no-op (:func:`cpu_checkpoint_stand_ins`)
    for ``dist_checkpointing``'s ``filesystem_async.preload_tensors``; only while a save/load
    runs, only without CUDA, restored on every exit path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from megatron.core.tensor_parallel import random as mcore_random

from megaquant.megatron.cpu.rng import CPURNGStatesTracker, install_cpu_rng_tracker

_ORIGINAL_CURRENT_DEVICE = torch.cuda.current_device


def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device`` on a machine without CUDA."""
    return torch.device("cpu")


def cpu_runtime_enabled() -> bool:
    return torch.cuda.current_device is _cpu_current_device


def enable_cpu_runtime() -> bool:
    """Turn on the CPU runtime (idempotent); returns False, doing nothing, when CUDA exists.

    Patches (all listed here; see the module docstring for why):
      * ``torch.cuda.current_device`` -> ``torch.device("cpu")``.
    Installs ``CPURNGStatesTracker`` as Megatron's RNG tracker object.
    """
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = _cpu_current_device
    install_cpu_rng_tracker()
    return True


def disable_cpu_runtime() -> None:
    """Undo ``enable_cpu_runtime`` (for tests that must leave the process as they found it)."""
    torch.cuda.current_device = _ORIGINAL_CURRENT_DEVICE
    if isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = None
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


@contextlib.contextmanager
def cpu_checkpoint_stand_ins() -> Iterator[None]:
    """During a ``dist_checkpointing`` save/load on CPU: ``torch.cuda.synchronize`` is a no-op
    and ``torch.cuda.current_device`` is the CPU. Restored on every exit path; does nothing
    when CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = _cpu_current_device
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


@contextlib.contextmanager
def cpu_runtime() -> Iterator[bool]:
    """``enable_cpu_runtime()`` for the ``with`` block only (the previous state is restored).

    Yields whether the CPU runtime is on inside the block (False on a machine with CUDA).
    """
    was_on = cpu_runtime_enabled()
    on = enable_cpu_runtime()
    try:
        yield on
    finally:
        if on and not was_on:
            disable_cpu_runtime()
