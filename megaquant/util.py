"""Three small helpers every layer needs once: rank-0 checks, atomic writes, flattened reductions.

* :func:`is_rank0`: the one rank that logs, shows progress bars and writes job files (also true
  without a process group, for single-process use).
* :func:`write_text_atomic` / :func:`write_json_atomic`: readers see the old file or the new
  one, never half of one (a temporary file beside the target, then ``os.replace``).
* :func:`all_reduce_flat`: reduce a list of tensors with *one* collective (flatten, reduce,
  split back), so the number of collectives does not depend on how many tensors there are.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def all_reduce_flat(tensors: list[torch.Tensor], group, op: str = "max") -> list[torch.Tensor]:
    """``op`` ("max" or "sum") over ``group`` for every tensor, with one collective; returns
    new tensors of the same shapes (the inputs themselves when there is nothing to reduce)."""
    if not tensors or group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
