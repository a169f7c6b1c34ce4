"""Load a Megatron distributed checkpoint without ever executing code from it.

A ``torch_dist`` checkpoint directory holds four kinds of files, and stock loading trusts three:

============== ======================================= ===================================
file           stock reader                            here
============== ======================================= ===================================
``.metadata``  ``pickle.load`` (torch's FileSystem-    a restricted unpickler that admits
               Reader): any callable can run           only the classes torch's DCP writes
``*.distcp``   tensors: ``torch.load(weights_only=     tensors unchanged; byte items
               True)``; byte items (Megatron's         (``ShardedObject``) must first pass
               ``ShardedObject``, e.g. ``_extra_state``, ``torch.load(weights_only=True)``
               RNG state): ``torch.load(weights_only=
               False)`` in DCP's DefaultLoadPlanner
``common.pt``  ``torch.load`` with torch's default     ``torch.load(weights_only=True)``
               (``weights_only`` unless the env var    always
               ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)
``*.json``     ``json``                                ``json`` (data only)
============== ======================================= ===================================

The restricted unpickler follows torch's ``weights_only`` unpickler: ``find_class`` is the only
way a pickle reaches a Python callable, so allowing a short list of (module, name) pairs -- the
DCP metadata dataclasses and enums, ``torch.Size``, torch dtypes and ``_get_layout`` -- means a
crafted ``.metadata`` cannot name ``os.system`` or ``builtins.eval``. Anything else is refused
with the file and the name it asked for.

How it plugs in: ``dist_checkpointing.load`` takes strategy objects. ``SafeLoadStrategy``
subclasses Megatron's ``TorchDistLoadShardedStrategy`` and, for the duration of its calls only,
makes the module's ``_get_filesystem_reader`` return ``SafeFileSystemReader`` (restored on every
exit path); ``SafeCommonStrategy`` subclasses ``TorchCommonLoadStrategy``. ``safe_strategies``
returns the pair for ``dist_checkpointing.load(..., sharded_strategy=, common_strategy=)``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

COMMON_FILE = "common.pt"
if not hasattr(mcore_torch, "_get_filesystem_reader"):  # never fall back to the unsafe reader
    raise ImportError("megatron-core no longer has strategies.torch._get_filesystem_reader, "
                      "which megaquant's safe checkpoint loading replaces; update "
                      "megaquant/megatron/safe_load.py for this Megatron release")

# Exactly what torch's DCP (2.4 .. 2.13) pickles into ``.metadata``; see the module docstring.
_DCP = "torch.distributed.checkpoint."
ALLOWED_GLOBALS = frozenset({
    (_DCP + "metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    (_DCP + "planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
} | {
    (_DCP + "filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
})


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to run code (or is not what megaquant/torch writes)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or damaged."""


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only ``ALLOWED_GLOBALS`` and dtypes."""

    def __init__(self, file, *, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS or _is_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load: it references {module}.{name}, which torch's "
            "checkpoint metadata never contains (a crafted file can run code this way). Nothing "
            "from it was executed; re-create the checkpoint from a source you trust")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.source}: refused to load: unexpected persistent id")


def restricted_load(path: str | os.PathLike) -> Any:
    """Unpickle a DCP ``.metadata`` file with ``RestrictedUnpickler``; errors name the file."""
    with open(path, "rb") as fh:
        try:
            return RestrictedUnpickler(fh, source=str(path)).load()
        except UnsafeCheckpointError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(
                f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {e}); the file "
                "is truncated or damaged: restore it or re-create the checkpoint") from e


def weights_only_load(data: io.BytesIO | str | os.PathLike, *, source: str) -> Any:
    """``torch.load(weights_only=True)`` with errors that name ``source``."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{source}: refused to load: it holds objects torch's weights-only loader does not "
            f"allow ({str(e).splitlines()[0][:200]}); nothing was executed. Re-create the "
            "checkpoint from a source you trust") from e
    except (EOFError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{source}: cannot be read ({type(e).__name__}: {e}); the "
                                     "file is truncated or damaged") from e


class _WeightsOnlyBytes:
    """Wraps DCP's load planner: a byte item must pass ``torch.load(weights_only=True)`` before
    the planner (which calls ``torch.load(weights_only=False)``) sees the same in-memory bytes.
    Having passed the weights-only unpickler, the bytes reference only allowed callables."""

    def __init__(self, planner, reader: SafeFileSystemReader):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        weights_only_load(value, source=self._reader.current_file)
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class SafeFileSystemReader(CachedMetadataFileSystemReader):
    """torch's FileSystemReader with a restricted ``.metadata`` unpickler and checked byte items."""

    current_file = "?"

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        if rank is None and self._cached_metadata is not None:
            return self._cached_metadata
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = restricted_load(Path(str(self.path)) / name)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if rank is None:
            self._cached_metadata = metadata
        return metadata

    def _slice_file(self, file, sinfo):
        self.current_file = getattr(file, "name", str(sinfo.relative_path))
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, _WeightsOnlyBytes(planner, self))
        except (EOFError, RuntimeError, AssertionError) as e:
            raise CorruptCheckpointError(f"{self.current_file}: cannot be read ({type(e).__name__}"
                                         f": {e}); the file is truncated or damaged") from e


@contextlib.contextmanager
def _safe_reader(checkpoint_dir) -> Iterator[None]:
    """Megatron's reader factory returns one ``SafeFileSystemReader`` whose metadata is read
    now: torch's loader turns a failing ``read_metadata`` into an AssertionError string, so the
    refusal (naming the file) is raised here, before torch is involved."""
    shared = SafeFileSystemReader(checkpoint_dir)
    shared.read_metadata()
    original = mcore_torch._get_filesystem_reader

    def reader(directory, cache_metadata: bool = False):
        if str(directory) == str(checkpoint_dir):
            return shared
        return SafeFileSystemReader(directory)

    mcore_torch._get_filesystem_reader = reader
    try:
        yield
    finally:
        mcore_torch._get_filesystem_reader = original


class SafeLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """Megatron's torch_dist load strategy reading through ``SafeFileSystemReader``."""

    def load(self, sharded_state_dict, checkpoint_dir):
        with _safe_reader(checkpoint_dir):
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        with _safe_reader(checkpoint_dir):
            return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with _safe_reader(checkpoint_dir):
            return super().load_sharded_metadata(checkpoint_dir)


class SafeCommonStrategy(TorchCommonLoadStrategy):
    """``common.pt`` read with ``torch.load(weights_only=True)``, whatever the environment says."""

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_FILE
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing: {checkpoint_dir} is incomplete")
        return weights_only_load(path, source=str(path))

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise AssertionError("torch_dist checkpoints keep sharded objects in the .distcp files")


def safe_strategies() -> tuple[SafeLoadStrategy, SafeCommonStrategy]:
    """``(sharded_strategy, common_strategy)`` for ``dist_checkpointing.load``."""
    return SafeLoadStrategy(), SafeCommonStrategy()


def unwrap_checkpoint_exception(exc: BaseException) -> BaseException:
    """The first of our own errors inside torch's ``CheckpointException`` (per-rank failures), or
    ``exc`` itself: torch wraps reader errors, which would otherwise print as a bare traceback."""
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, (UnsafeCheckpointError, CorruptCheckpointError)):
            return inner
    return exc
