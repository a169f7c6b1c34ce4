"""Parallel amax synchronisation: which quantizer reduces over which process group, and why.

After calibration every rank holds amax values computed from *its* shard of weights and *its*
data. A format's scale must be the one the unsharded, single-process model would compute, so:

Tensor-parallel group (MAX), per quantizer, decided by :func:`tp_reduced`:

* A **per-tensor** amax is always reduced over TP. Column-parallel weights are split along the
  output dim, row-parallel weights along the input dim, row-parallel inputs along the hidden dim:
  in every case the shards must share one scale. (Column-parallel inputs are replicated, or split
  along the sequence under sequence parallelism; the reduction makes them agree either way.)
* A **per-channel** amax along axis ``a`` stays **sharded** when ``a`` is the tensor's partition
  axis (column-parallel weight, axis 0: each rank owns its output channels) and is reduced over TP
  otherwise (row-parallel weight, axis 0: every rank saw only part of each output channel's row).

Data-parallel group (MAX): every quantizer. Activations differ across DP ranks; weights are
identical there, so the reduction is a no-op for them, kept for uniformity and as a cheap guard.

Deadlock freedom: every rank walks the same quantizers in the same order (``named_modules`` of
identically built models) and contributes a value even when it collected nothing (zeros, which
are neutral for MAX of absolute values). Values are flattened into one tensor per group, so the
number of collectives does not depend on the model size or on what the data did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaquant.quantizer import TensorQuantizer


@dataclass
class SyncItem:
    """One calibrating quantizer with its partition axis in the owning layer (None: replicated)."""

    name: str
    quantizer: TensorQuantizer
    partition_axis: int | None
    shape_hint: torch.Size | None = None  # the tensor's local shape, for per-channel zeros
    role: str = "input"


def sharded_amax_axis(fmt, partition_axis: int | None, ndim: int) -> int | None:
    """The axis along which an amax is split over TP (None: the amax is shared by the group).

    Only a per-channel amax whose channel axis is the tensor's partition axis stays sharded.
    Checkpointing (megaquant.nn.base) uses the same answer to describe the amax's shards.
    """
    axis = getattr(fmt, "axis", None)
    if axis is None or partition_axis is None:
        return None
    return axis % ndim if axis % ndim == partition_axis % ndim else None


def tp_reduced(item: SyncItem) -> bool:
    """True when this quantizer's amax must be MAX-reduced over the tensor-parallel group."""
    ndim = len(item.shape_hint) if item.shape_hint is not None else 2
    return sharded_amax_axis(item.quantizer.fmt, item.partition_axis, ndim) is None


def _local_amax(item: SyncItem) -> torch.Tensor:
    amax = item.quantizer.calib_amax()
    if amax is not None:
        return amax.float()
    if getattr(item.quantizer.fmt, "axis", None) is None:
        return torch.zeros((), dtype=torch.float32, device=item.quantizer.amax.device)
    if item.shape_hint is None:
        raise RuntimeError(f"{item.name}: no calibration data and no shape for a per-channel amax")
    zeros = torch.zeros(item.shape_hint, device=item.quantizer.amax.device)
    return item.quantizer.fmt.compute_amax(zeros)


def _reduce_max(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """MAX-reduce a list of tensors with one collective (flatten, reduce, split back)."""
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def check_finite(items: list[SyncItem], group) -> None:
    """Raise on every rank if any rank saw a non-finite value (one collective, no hang).

    Each quantizer contributes the 1-based index of its first bad batch (0 if none); after a MAX
    over ``group`` (the whole job) every rank knows about every bad quantizer and raises the same
    error, so no rank is left waiting in a collective.
    """
    bad = torch.tensor([float(i.quantizer.first_nonfinite_batch or 0) for i in items])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    hits = [(i.name, int(b)) for i, b in zip(items, bad.tolist()) if b > 0]
    if hits:
        shown = "; ".join(f"{name} at calibration batch {b}" for name, b in hits[:5])
        more = f" (and {len(hits) - 5} more)" if len(hits) > 5 else ""
        raise FloatingPointError(
            f"non-finite activations (NaN/inf) during calibration: {shown}{more}. Check the model "
            "weights and inputs in float32, or exclude these layers in the recipe."
        )


def sync_amax(items: list[SyncItem], tp_group, dp_group) -> list[torch.Tensor]:
    """Synchronised amax per item, following the rules in the module docstring."""
    amaxes = [_local_amax(i) for i in items]
    tp_idx = [k for k, i in enumerate(items) if tp_reduced(i)]
    reduced = _reduce_max([amaxes[k] for k in tp_idx], tp_group)
    for k, r in zip(tp_idx, reduced):
        amaxes[k] = r
    return _reduce_max(amaxes, dp_group)
