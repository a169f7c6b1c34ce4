"""When and how the format kernels run compiled (the fast path).

An eager chain of ~15 torch ops reads and writes the whole tensor ~15 times; NVFP4 fake-quant
then runs at ~0.04x of ``x.clone()`` bandwidth. ``torch.compile`` (inductor: C++/OpenMP on CPU,
Triton on GPU) fuses each kernel into one or two passes. The kernel functions are pure float32
arithmetic and bit views written so that compiled and eager execute the same IEEE operations
(no reciprocal tricks, no fp contraction: inductor compiles with ``-ffp-contract=off`` and without
unsafe math) — so the compiled result is bit-identical, which the tests check.

Policy, from the ``MEGAQUANT_KERNEL`` environment variable (read at every call):

* ``auto`` (default): compiled for tensors with at least ``MEGAQUANT_COMPILE_MIN_NUMEL``
  elements (default 2^18 = 262144), eager below. Small tensors are cheap eagerly and would pay
  seconds of compile latency each; big ones (real weights/activations) amortise it.
* ``compiled``: always compiled (tests of the fast path use this).
* ``eager``: never compiled (the reference).

Each kernel is compiled with ``fullgraph=True`` (no graph breaks) and torch's automatic dynamic
shapes (``dynamic=None``): the first shape gets a static kernel, the first *different* shape one
shape-generic recompile, and no further shape recompiles. (``dynamic=True`` from the start also
made the block size symbolic — masked tail loops, slower.) A new input dtype, static vs dynamic
amax, or forward-only vs STE (mask output) variant compiles once more each. Compiling takes
~10-30 s per variant on the 2-core CPU; inductor's on-disk cache shortens repeats. If
compilation or the compiled call fails, a warning naming the error is issued once per kernel and
that kernel falls back to eager for the rest of the process — never silently.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import Tensor

_MODES = ("auto", "eager", "compiled")
_DEFAULT_MIN_NUMEL = 1 << 18
_DYNAMIC = None  # automatic dynamic shapes: static first, dynamic after a shape changes

_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()


def kernel_mode() -> str:
    mode = os.environ.get("MEGAQUANT_KERNEL", "auto")
    if mode not in _MODES:
        raise ValueError(f"MEGAQUANT_KERNEL={mode!r} is not valid; choose one of {list(_MODES)}.")
    return mode


def _min_numel() -> int:
    return int(os.environ.get("MEGAQUANT_COMPILE_MIN_NUMEL", _DEFAULT_MIN_NUMEL))


def use_compiled(x: Tensor) -> bool:
    """Whether a kernel call on ``x`` should take the compiled path (see module docstring)."""
    if torch.compiler.is_compiling():
        return False  # already inside a user's torch.compile region: inline the eager math
    mode = kernel_mode()
    return mode == "compiled" or (mode == "auto" and x.numel() >= _min_numel())


def _get_compiled(kernel: Callable) -> Callable:
    fn = _compiled.get(kernel)
    if fn is None:
        fn = torch.compile(kernel, dynamic=_DYNAMIC, fullgraph=True)
        _compiled[kernel] = fn
    return fn


def run_kernel(kernel: Callable, x: Tensor, amax: Tensor | None, want_mask: bool, params: tuple):
    """Run ``kernel(x, amax, want_mask, *params)``, compiled when the policy says so."""
    if kernel not in _failed and use_compiled(x):
        try:
            return _get_compiled(kernel)(x, amax, want_mask, *params)
        except Exception as err:  # compile errors surface at the first call
            _failed.add(kernel)
            warnings.warn(
                f"megaquant: compiling {kernel.__name__} failed ({type(err).__name__}: {err}); "
                "falling back to the eager kernel (slower, same numbers). Set MEGAQUANT_KERNEL=eager "
                "to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
    return kernel(x, amax, want_mask, *params)


def reset() -> None:
    """Forget compiled kernels and failures (tests use this)."""
    _compiled.clear()
    _failed.clear()
