"""Write a directory of files atomically: all of it appears, or nothing does.

Everything goes into ``.<name>.partial-<pid>`` beside the target, which is renamed into place at
the end (an existing target, only with ``overwrite=True``, is first moved to ``.<name>.old`` and
deleted after the swap). Any failure (disk full, permissions, a bug) removes the partial
directory and re-raises with the target named, so no half-written export is left behind.

Safetensors shards: tensors are taken in sorted-name order and cut into files of at most
``max_shard_bytes``; one file is ``model.safetensors``, several are
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (``weight_map``), as
``save_pretrained`` writes them. Nothing written depends on the clock or the machine, so the same
tensors give byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse before writing anything: a non-empty target without overwrite, or a file."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"export target {target} exists and is not a directory; pick another path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"export target {target} exists and is not empty; pass overwrite=true "
                         "(scripts/export.py ... overwrite=true, or export_model(..., "
                         "overwrite=True)) to replace it, or pick another path")


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory that becomes ``target`` when the block exits cleanly."""
    target = Path(target).absolute()
    check_target(target, overwrite)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    except OSError as e:
        raise OSError(f"cannot create the export directory beside {target}: {e}") from e
    try:
        yield partial
        if target.exists():
            target.rename(old)
        partial.rename(target)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)  # put the previous export back
        if isinstance(e, OSError):
            raise OSError(f"export to {target} failed, nothing was written: {e}") from e
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names per shard, in sorted order, each shard at most ``max_shard_bytes`` (or one tensor)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = _nbytes(tensors[name])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int
                      ) -> list[str]:
    """Write ``tensors`` as safetensors shards (+ index when several); returns the file names."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    weight_map = {}
    for fname, members in zip(names, shards):
        # clone: q/k/v share one activation-scale tensor, safetensors refuses shared storage
        try:
            save_file({k: tensors[k].detach().clone().contiguous() for k in members},
                      str(directory / fname), metadata={"format": "pt"})
        except Exception as e:  # safetensors' SafetensorError is not an OSError, even for ENOSPC
            if isinstance(e, OSError):
                raise
            raise OSError(f"writing {directory / fname} failed: {e}") from e
        # safetensors creates 0600 files; servers may run as another user
        os.chmod(directory / fname, 0o644)
        weight_map.update({k: fname for k in members})
    if n > 1:
        total = sum(_nbytes(t) for t in tensors.values())
        write_json(directory / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names
