"""When and how the format kernels run compiled (the fast path).

An eager chain of ~15 torch ops reads and writes the whole tensor ~15 times; NVFP4 fake-quant
then runs at ~0.05x of ``x.clone()`` bandwidth. ``torch.compile`` (inductor: C++/OpenMP on CPU,
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

Blockwise kernels (NVFP4, MX, INT4: registered with :func:`blockwise`) are compiled on a flat
``[rows, block_size]`` view: blocks are independent and a tensor-wide amax does not depend on
the layout, so the numbers are those of the original shape. Only ``rows`` varies between
tensors, and it is marked dynamic before the first compile, so one kernel serves every shape —
a QAT run over many weight and activation shapes compiles each variant once instead of hitting
torch.compile's recompile limit. The flat view also avoids a copy pass: on a symbolic
``[..., K]`` shape inductor could not prove the un-blocking reshape a view and wrote the output
twice. A last dim that is not a multiple of the block is zero-padded (and the output sliced)
outside the compiled kernel: two extra passes, for shapes real models rarely have.

Other kernels (FP8, INT8) are compiled on the tensor's own shape with torch's automatic
dynamic shapes: a static kernel for the first shape, one shape-generic recompile for the next.

A *variant* — input dtype, static vs dynamic amax, forward-only vs STE (mask output), format
parameters — compiles once each (~10-30 s on the 2-core CPU; inductor's on-disk cache shortens
repeats). Compiled calls run under ``no_grad`` (the STE owns the gradient) so grad mode is not
one more variant. If compilation or the compiled call fails, a warning naming the error is
issued once per kernel and that kernel falls back to eager for the rest of the process — never
silently.

Kernels may return the keep mask as uint8 0/1 (see ``rounding.keep_mask``: inductor's CPU
bool stores are slow); it is handed on as a bool view, free. A kernel may return more than
``(out, keep)``: extra outputs are intermediates it wants inductor to store rather than recompute
inline (see ``nvfp4_kernel``); they are dropped.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Callable

import torch
from torch import Tensor

_MODES = ("auto", "eager", "compiled")
_DEFAULT_MIN_NUMEL = 1 << 18
# Variants (dtype x amax kind x mask x params) are bounded by the program, not by the data: allow
# more of them than torch's default 8 per function, where this torch lets us say so.
_RECOMPILE_LIMIT = 32
_COMPILE_KWARGS = {"fullgraph": True, "dynamic": None}
if "recompile_limit" in inspect.signature(torch.compile).parameters:
    _COMPILE_KWARGS["recompile_limit"] = _RECOMPILE_LIMIT

_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()
_BLOCK_PARAM: dict[Callable, int] = {}  # blockwise kernel -> index of its block size in params


def blockwise(block_param: int = 0) -> Callable[[Callable], Callable]:
    """Register a kernel as blockwise along the last dim, block size ``params[block_param]``.

    Contract: the kernel treats each block of the last dim independently (plus, at most, one
    amax over the whole tensor, which zero padding cannot change), so running it on
    ``x.reshape(-1, block)`` gives the same numbers as on ``x``.
    """

    def register(kernel: Callable) -> Callable:
        _BLOCK_PARAM[kernel] = block_param
        return kernel

    return register


def kernel_mode() -> str:
    mode = os.environ.get("MEGAQUANT_KERNEL", "auto")
    if mode not in _MODES:
        raise ValueError(f"MEGAQUANT_KERNEL={mode!r} is not valid; choose one of {list(_MODES)}.")
    return mode


def _min_numel() -> int:
    return int(os.environ.get("MEGAQUANT_COMPILE_MIN_NUMEL", _DEFAULT_MIN_NUMEL))


def use_compiled(x: Tensor, min_numel: int | None = None) -> bool:
    """Whether a kernel call on ``x`` should take the compiled path (see module docstring).

    ``min_numel``: a lower size threshold for ``auto`` than ``MEGAQUANT_COMPILE_MIN_NUMEL``
    (the learnable-scale kernels, whose eager form costs several passes, use one)."""
    if torch.compiler.is_compiling():
        return False  # already inside a user's torch.compile region: inline the eager math
    mode = kernel_mode()
    least = _min_numel() if min_numel is None else min(min_numel, _min_numel())
    return x.numel() > 0 and (mode == "compiled" or (mode == "auto" and x.numel() >= least))


def _get_compiled(kernel: Callable) -> Callable:
    fn = _compiled.get(kernel)
    if fn is None:
        fn = torch.compile(kernel, **_COMPILE_KWARGS)
        _compiled[kernel] = fn
    return fn


def _as_bool(keep: Tensor | None) -> Tensor | None:
    return keep.view(torch.bool) if keep is not None and keep.dtype == torch.uint8 else keep


def _to_rows(x: Tensor, block: int) -> Tensor:
    """x as a contiguous [rows, block] tensor, the last dim zero-padded to a multiple of block."""
    k = x.shape[-1] if x.dim() else 1
    x2 = x.reshape(-1, k)
    if k % block:
        x2 = torch.nn.functional.pad(x2, (0, -k % block))
    return x2.reshape(-1, block).contiguous()


def _from_rows(t: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_to_rows`: drop the padding, back to ``shape``."""
    k = shape[-1] if len(shape) else 1
    t = t.reshape(-1, k + (-k % t.shape[-1]))
    return t[:, :k].reshape(shape)


def _run_compiled(kernel: Callable, x: Tensor, amax, want_mask: bool, params: tuple):
    fn = _get_compiled(kernel)
    x = x.detach()  # requires_grad would be one more guard, so one more compile
    if kernel not in _BLOCK_PARAM:
        return fn(x, amax, want_mask, *params)[:2]
    rows = _to_rows(x, params[_BLOCK_PARAM[kernel]])
    torch._dynamo.maybe_mark_dynamic(rows, 0)  # compile shape-generic in rows from the start
    torch._dynamo.mark_static(rows, 1)  # the block size stays a constant (vectorised, unmasked)
    out, keep = fn(rows, amax, want_mask, *params)[:2]
    return _from_rows(out, x.shape), (None if keep is None else _from_rows(keep, x.shape))


def run_kernel(kernel: Callable, x: Tensor, amax: Tensor | None, want_mask: bool, params: tuple):
    """Run ``kernel(x, amax, want_mask, *params)``, compiled when the policy says so."""
    with torch.no_grad():  # the STE owns the gradient; no graph, and grad mode is no variant
        if kernel not in _failed and use_compiled(x):
            try:
                out, keep = _run_compiled(kernel, x, amax, want_mask, params)
                return out, _as_bool(keep)
            except Exception as err:  # noqa: BLE001 - compile errors surface at the first call
                _failed.add(kernel)
                warnings.warn(
                    f"megaquant: compiling {kernel.__name__} failed ({type(err).__name__}: {err}); "
                    "falling back to the eager kernel (slower, same numbers). Set "
                    "MEGAQUANT_KERNEL=eager to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        out, keep = kernel(x, amax, want_mask, *params)[:2]
        return out, _as_bool(keep)


def reset() -> None:
    """Forget compiled kernels and failures (tests use this)."""
    _compiled.clear()
    _failed.clear()
