"""A run's output directory: one run at a time, ``run.overwrite`` honoured, results committed whole.

Three files sit beside ``run.output_dir`` (``out``), never inside it:

* ``.out.lock`` -- an exclusive ``fcntl.flock`` held by rank 0 for the whole run, with the
  holder's pid, host, start time and command line written in it. A second run into the same
  directory fails at once, naming the holder; the kernel drops the lock when the holder dies,
  so a crashed run never leaves a stale lock (the file itself stays, harmlessly).
* ``.out.partial/`` -- the staging directory: the checkpoint, ``summary.json`` and
  ``report.md`` are all written here, and ``commit`` makes them the output with one rename
  (the previous output moves to ``.out.old`` for that instant and is then deleted). A reader
  never sees a new checkpoint beside an old summary, or a half-written one.
* ``.out.old/`` -- exists only between the two renames of a commit.

At the next start (lock held), leftovers of an interrupted run are cleaned and reported: a
``.partial`` is deleted (it was never committed); an ``.old`` is renamed back when the output is
missing (the kill fell between the renames) or deleted when the new output is in place.

``run.overwrite=true`` (the default) replaces an earlier run's output atomically;
``run.overwrite=false`` refuses a non-empty output directory before any work is done.
All ranks call ``claim_output_dir``; only rank 0 touches the file system, and its verdict is
broadcast so every rank raises the same error instead of waiting in a collective.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("megaquant.outdir")


class OutputDirBusy(RuntimeError):
    """Another run holds the output directory's lock."""


class OutputDir:
    """Rank 0's handle on a locked output directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, key: str = "run.output_dir"):
        self.target = Path(path).absolute()
        self.key = key
        name, parent = self.target.name, self.target.parent
        self.lock_path = parent / f".{name}.lock"
        self.staging = parent / f".{name}.partial"
        self.old = parent / f".{name}.old"
        self._fh = None

    def acquire(self, *, overwrite: bool) -> list[str]:
        """Lock, clean leftovers, check ``overwrite``; returns notes about what was cleaned."""
        if self.target.exists() and not self.target.is_dir():
            raise ValueError(f"{self.key}={self.target} is a file; choose a directory path")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.lock_path, "a+")  # noqa: SIM115 - held open (locked) for the run
        except OSError as e:
            raise OSError(e.errno, f"cannot create {self.lock_path} for {self.key}: "
                          f"{e.strerror}; choose a writable {self.key}") from e
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OutputDirBusy(f"{self.key}={self.target} is in use by {holder} (lock "
                                f"{self.lock_path}); wait for that run to end or choose another "
                                f"{self.key}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}\n")
        fh.flush()
        self._fh = fh
        try:
            notes = self._recover()
            if not overwrite and self.target.is_dir() and any(self.target.iterdir()):
                raise ValueError(
                    f"{self.key}={self.target} is not empty and run.overwrite=false; choose "
                    "another run.output_dir, or set run.overwrite=true to replace it")
        except BaseException:
            self.release()
            raise
        return notes

    def _recover(self) -> list[str]:
        notes = []
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
            notes.append(f"removed {self.staging}, left by an interrupted run")
        if self.old.exists():
            if not self.target.exists():
                self.old.rename(self.target)
                notes.append(f"restored the previous output from {self.old} (a run was killed "
                             "while committing)")
            else:
                shutil.rmtree(self.old, ignore_errors=True)
                notes.append(f"removed {self.old}, left by a run killed after committing")
        return notes

    def new_staging(self) -> Path:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self) -> None:
        """Make the staging directory the output (one rename; the old output is deleted)."""
        if self.target.exists():
            self.target.rename(self.old)
        self.staging.rename(self.target)
        shutil.rmtree(self.old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _same_verdict(error: BaseException | None) -> None:
    """Raise rank 0's error on every rank (rank 0 re-raises its own)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise RuntimeError(f"rank 0 refused the output directory: {box[0]}")
    if error is not None:
        raise error


class ClaimedOutput:
    """What every rank sees: the staging path and a collective ``commit``."""

    def __init__(self, handle: OutputDir):
        self.handle = handle
        self.target, self.staging = handle.target, handle.staging

    def commit(self) -> None:
        """Collective: all ranks' files are in staging; rank 0 renames it into place."""
        if dist.is_initialized():
            dist.barrier()
        if _rank0():
            self.handle.commit()
        if dist.is_initialized():
            dist.barrier()


@contextlib.contextmanager
def claim_output_dir(path: str | os.PathLike, *, overwrite: bool, key: str = "run.output_dir",
                     staging: bool = True) -> Iterator[ClaimedOutput]:
    """Collective: hold ``path`` for the block (see the module docstring). Staging is created
    empty; anything not committed when the block exits is removed. ``staging=False`` only locks
    (QAT writes its step checkpoints in place, each one atomically)."""
    handle = OutputDir(path, key=key)
    error = None
    if _rank0():
        try:
            for note in handle.acquire(overwrite=overwrite):
                log.warning("%s", note)
            if staging:
                handle.new_staging()
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank just below
            handle.release()
            error = e
    _same_verdict(error)
    try:
        yield ClaimedOutput(handle)
    finally:
        if _rank0():
            handle.abort()
            handle.release()
