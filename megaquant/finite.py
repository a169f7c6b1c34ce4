"""Finite checks on what is about to be saved or exported: quantized weights, scales, tensors.

Calibration already refuses non-finite activations, but only quantizers that collect an amax
see data: a weight-only blockwise recipe (``int4_w4a16``: scales computed from the weight at
use) never looked, and a NaN weight went through PTQ and export into a NaN ``weight_scale``.
These checks run whatever the recipe, before a checkpoint is saved and before an export is
written, and name the first bad tensors. They are a few ``isfinite`` reductions per tensor
(one host sync per check, not per batch); under several ranks the verdict is all-reduced.
"""

from __future__ import annotations

import torch
from torch import nn


def _count_bad(t: torch.Tensor) -> tuple[int, int]:
    t = t.detach()
    if not t.is_floating_point():
        return 0, 0
    if t.element_size() == 1:  # float8 has no isnan kernel everywhere: widen first
        t = t.float()
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def _describe(bad: list[tuple[str, int, int]]) -> str:
    shown = "; ".join(f"{n} ({nan} NaN, {inf} inf)" for n, nan, inf in bad[:5])
    return shown + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")


def nonfinite_quantized(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(name, #NaN, #inf)`` of every non-finite quantized weight or quantizer amax (scale)."""
    from megaquant.quantizer import TensorQuantizer

    bad = []
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            if module.is_enabled and module.has_amax:
                nan, inf = _count_bad(module.amax)
                if nan or inf:
                    bad.append((f"{name}.amax", nan, inf))
            continue
        wq = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if isinstance(wq, TensorQuantizer) and wq.is_enabled and isinstance(weight, torch.Tensor):
            nan, inf = _count_bad(weight)
            if nan or inf:
                bad.append((f"{name}.weight", nan, inf))
    return bad


def check_quantized_finite(model: nn.Module, *, before: str, group=None) -> None:
    """Raise FloatingPointError naming non-finite quantized weights/scales, ``before`` an action.

    Collective when a process group is initialised: the count of bad tensors is summed over
    ``group`` (default: the world), so every rank raises together -- a NaN in one TP shard must
    not leave the other ranks waiting in the save that follows.
    """
    import torch.distributed as dist

    bad = nonfinite_quantized(model)
    total = len(bad)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        device = next(model.parameters()).device
        count = torch.tensor([float(total)], device=device)
        dist.all_reduce(count, group=group)
        total = int(count.item())
    if total and not bad:
        raise FloatingPointError(f"non-finite quantized weights or scales on another rank before "
                                 f"{before} (that rank names them). Nothing was written")
    if bad:
        raise FloatingPointError(
            f"non-finite values in quantized weights or scales before {before}: {_describe(bad)}. "
            "A weight that is NaN/inf comes from the source model (check model.path and its "
            "conversion); an amax that is not comes from calibration. Nothing was written")


def check_tensors_finite(tensors: dict[str, torch.Tensor], *, before: str) -> None:
    """Raise FloatingPointError naming the non-finite floating tensors of ``tensors``."""
    bad = []
    for name in sorted(tensors):
        nan, inf = _count_bad(tensors[name])
        if nan or inf:
            bad.append((name, nan, inf))
    if bad:
        raise FloatingPointError(f"non-finite tensors before {before}: {_describe(bad)}; "
                                 "serving engines would compute NaN. Nothing was written")
