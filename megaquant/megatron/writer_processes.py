"""Make the processes Megatron forks to write checkpoint shards die with the process that forked
them.

megatron-core's ``FileSystemWriterAsync.write_preloaded_data_multiproc`` forks one writer per
bucket (``mp.get_context("fork")``). Killed mid-save, the parent leaves those writers running:
one was seen holding 1.2 GB for minutes. Linux can tie a child's life to its parent with
``prctl(PR_SET_PDEATHSIG, SIGKILL)``, called in the child; ``os.register_at_fork`` runs our hook in
every forked child, and the hook acts only while ``die_with_parent()`` is active in the parent.
Elsewhere (macOS, no libc) it does nothing, which is the old behaviour.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1
_active = threading.local()
_registered = False
_libc = None
_parent_pid = 0


def _set_pdeathsig() -> None:
    if not getattr(_active, "on", False) or _libc is None:
        return
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _parent_pid:  # the parent died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def _load_libc():
    try:  # loaded in the parent: the child must call prctl at once, not search for libc
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@contextlib.contextmanager
def die_with_parent() -> Iterator[None]:
    """Children forked by this thread inside the block get SIGKILL when the parent dies."""
    global _registered, _libc, _parent_pid
    if not _registered and hasattr(os, "register_at_fork") and sys.platform == "linux":
        _libc = _load_libc()
        os.register_at_fork(after_in_child=_set_pdeathsig)
        _registered = True
    _parent_pid = os.getpid()
    _active.on = True
    try:
        yield
    finally:
        _active.on = False
