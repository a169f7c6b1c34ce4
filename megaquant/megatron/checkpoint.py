"""Save and load a Megatron model with ``dist_checkpointing``, atomically, at any TP layout.

Format: the directory Megatron's ``dist_checkpointing.save`` writes (each rank writes the
shards it owns, described by ``model.sharded_state_dict()``), plus ``megaquant.json`` with
the caller's metadata, the megaquant version and the parallel layout it was saved at. Because
shards carry their global offsets, ``load_checkpoint`` fills a model built at a different
tensor-parallel size (saved at TP=2, loaded at TP=1, and back).

Atomicity: ranks write into ``.<name>.partial`` beside the target; after a barrier rank 0
renames the old checkpoint to ``.<name>.old``, the partial one into place, and deletes the
old. A crash while writing leaves the previous checkpoint untouched; a crash between the two
renames (two system calls) leaves it at ``.<name>.old``, which ``load_checkpoint`` names in
its error. All ranks must see the same filesystem (as ``dist_checkpointing`` requires).

Trust: every load reads through ``safe_load`` (no pickle from the checkpoint can run code) after
the files are checked against the ``manifest.json`` of SHA-256 digests written at save time
(``megaquant.manifest``): a corrupted or truncated file is refused by name before it is read.
Checkpoints from before manifests load with a warning. A failed save removes its partial
directory; the writer processes Megatron forks die with their parent (``die_with_parent``).

On CPU the save/load runs inside ``cpu.device.cpu_checkpoint_stand_ins()`` (no-op
``torch.cuda.synchronize``, CPU ``current_device``); on GPU nothing is patched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

import megaquant
from megaquant import manifest
from megaquant.megatron.cpu.device import cpu_checkpoint_stand_ins
from megaquant.megatron.safe_load import safe_strategies, unwrap_checkpoint_exception
from megaquant.megatron.writer_processes import die_with_parent

METADATA_FILE = "megaquant.json"
log = logging.getLogger("megaquant.checkpoint")


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _siblings(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")


def save_checkpoint(model: torch.nn.Module, directory: str | Path, *,
                    metadata: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory once it is in place.

    ``metadata`` must be JSON-serialisable (recipe name, data, ...); it is stored with the
    megaquant version and the parallel layout under ``megaquant.json``.
    """
    target = Path(directory).absolute()
    partial, old = _siblings(target)
    record = {"megaquant_version": megaquant.__version__, "parallel": _layout(),
              "metadata": metadata}
    rank0 = dist.get_rank() == 0
    if rank0:
        json.dumps(record)  # fail before writing anything if metadata is not JSON
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save
        partial.mkdir(parents=True)
    dist.barrier()
    try:
        with cpu_checkpoint_stand_ins(), _in_process_write_results(), die_with_parent():
            dist_checkpointing.save(model.sharded_state_dict(), str(partial))
        if rank0:
            (partial / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        dist.barrier()  # every shard is on disk before the manifest and the swap
        if rank0:
            manifest.write_manifest(partial)
    except BaseException as e:
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)  # a failed save leaves nothing behind
        if not isinstance(e, Exception):
            raise
        why = f"saving the checkpoint {target} failed ({type(e).__name__}: {e}); its partial " \
              "files were removed. If the disk is full, free space or choose another directory"
        if isinstance(e, OSError):  # Megatron's writer reports ENOSPC as RuntimeError
            raise OSError(e.errno, why) from e
        raise RuntimeError(why) from e
    if rank0:
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        partial.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody returns (and, say, loads) before the swap
    return target


@contextlib.contextmanager
def _in_process_write_results():
    """Collect the writer's results in an in-process queue instead of a spawned Manager.

    megatron-core's async filesystem writer creates its results queue with
    ``mp.get_context("spawn").Manager()``: a server process that re-imports the main module
    (megatron and all) on every first save, about 15 s on 2 cores. Our saves are synchronous
    (the write runs in this process and puts its result here), so a plain queue carries the
    same results. Restored on exit; a no-op on releases that drop the private global.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if not hasattr(fa, "_results_queue") or fa._results_queue is not None:
        yield
        return
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = None


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The ``megaquant.json`` record of a checkpoint (version, layout, user metadata)."""
    target = Path(directory)
    path = target / METADATA_FILE
    if not path.exists():
        _, old = _siblings(target.absolute())
        hint = (f"; a save was interrupted while swapping, the previous checkpoint is at {old}: "
                f"rename it to {target}") if old.exists() else ""
        if (target / "checkpoint" / METADATA_FILE).exists():
            hint = f"; {target} is a run directory: use {target / 'checkpoint'}"
        raise FileNotFoundError(f"{path} not found: {target} is not a megaquant checkpoint{hint}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise manifest.ManifestError(f"{path} is damaged ({e}); restore it or re-create the "
                                     "checkpoint") from e


def verify_checkpoint(directory: str | Path) -> None:
    """Check the checkpoint's files against its manifest; collective when a group exists.

    Each rank hashes ``files[rank::world]`` and the verdicts are gathered, so every rank raises
    the same ``ManifestError`` (naming the files) and nobody is left waiting in a collective.
    """
    record = manifest.read_manifest(directory)
    if record is None:
        log.warning("%s has no %s (saved before megaquant 0.x manifests): its files cannot be "
                    "verified", directory, manifest.MANIFEST)
        return
    names = sorted(record["files"])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return manifest.raise_problems(directory, manifest.check_files(directory, record, names))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = manifest.check_files(directory, record, names[rank::world])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    manifest.raise_problems(directory, [p for part in gathered for p in part])


def _model_layers(model) -> int | None:
    """Decoder layers of the whole model (every pipeline stage), from its Megatron config;
    ``model`` may be a wrapper that holds it as ``.model`` (``train.state.TrainState``)."""
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config",
                                                       None)
    return getattr(config, "num_layers", None)


def check_layer_count(model, record: dict, directory) -> None:
    """Refuse a checkpoint of another depth before Megatron's loader does (its message names a
    stacked tensor's global shape, not layers): name both counts and what would fit.

    Checkpoint keys carry global layer numbers (any TP/PP size loads), so the count compared is
    the whole model's, ``config.num_layers``, at every pipeline size.
    """
    saved = ((record.get("metadata") or {}).get("arch") or {}).get("num_layers")
    have = _model_layers(model)
    if saved is None or have is None or int(saved) == int(have):
        return
    raise ValueError(
        f"{directory} holds a model of {saved} decoder layers, but the model built here has "
        f"{have}; set model.arch.num_layers={saved} (model.source=random), or load it with "
        f"model.source=megatron model.path={directory} (which reads its architecture), or use "
        f"a checkpoint of a {have}-layer model")


def load_checkpoint(model: torch.nn.Module, directory: str | Path, *,
                    verify: bool = True) -> dict[str, Any]:
    """Collective: load the checkpoint into ``model`` (built at any TP size); return metadata.

    Returns the user ``metadata`` given to ``save_checkpoint``; the full record (version,
    layout) is available from ``read_metadata``. ``verify=False`` skips the manifest check for
    a caller that has just run ``verify_checkpoint`` itself.
    """
    record = read_metadata(directory)
    check_layer_count(model, record, directory)
    if verify:
        verify_checkpoint(directory)
    sharded, common = safe_strategies()
    try:
        with cpu_checkpoint_stand_ins():
            state = dist_checkpointing.load(model.sharded_state_dict(), str(directory),
                                            sharded_strategy=sharded, common_strategy=common)
    except BaseException as e:
        inner = unwrap_checkpoint_exception(e)
        if inner is not e:
            raise inner from None
        raise
    model.load_state_dict(state, strict=True)
    return record["metadata"]
