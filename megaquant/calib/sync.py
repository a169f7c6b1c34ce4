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

Mixture of experts (routed experts: layers with ``is_expert=True`` inside a ``SequentialMLP`` or
``TEGroupedMLP``; shared experts and routers are dense layers and follow the rules above):

* **TP** is the layer's own ``tp_group``, which for an expert is the *expert*-tensor-parallel
  group; the per-tensor / per-channel rules above apply unchanged (weights sharded like dense
  ones; tokens reach every expert-TP rank whole, so inputs agree after the reduction).
* **Data parallel** for an expert is the **expert-data-parallel** group: the ranks holding a
  replica of the *same* experts with different tokens. The dense DP group is wrong here: at
  EP=2 on 2 ranks it joins rank 0's expert 0 with rank 1's expert 2.
* **Weight** amax is never reduced over the **expert-parallel** group: EP ranks hold
  *different* experts, each with its own scale. Weights give every expert an amax, tokens or
  not.
* **Input** (and output) amax: each expert keeps its own by default -- the tokens routed to an
  expert from every EP rank reach the rank that holds it, so after expert-DP its amax already
  covers all the data. A *pool* per (expert module, quantizer) -- MAX over local experts, then
  MAX over EP (and, being built from synced values, over expert-TP/DP too) -- is computed on
  every rank unconditionally (one flattened collective per EP group) and used
    - by every expert when ``share_expert_inputs`` is set, or for grouped layers whose one input
      quantizer serves all local experts (a grouped GEMM has one activation scale): one scale
      for *all* experts, so EP=1 and EP=4 give the same number;
    - by an expert whose amax is still 0 after sync (it received no calibration token on any
      rank): the layer's scale instead of a meaningless one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaquant.nn.base import sharded_amax_axis
from megaquant.quantizer import TensorQuantizer
from megaquant.util import all_reduce_flat


@dataclass
class SyncItem:
    """One calibrating quantizer with its partition axis in the owning layer (None: replicated)."""

    name: str
    quantizer: TensorQuantizer
    partition_axis: int | None
    shape_hint: torch.Size | None = None  # the tensor's local shape, for per-channel zeros
    role: str = "input"
    tp_group: object = None  # the layer's (expert-)TP group
    dp_group: object = None  # DP for dense layers, expert-DP for routed experts
    ep_group: object = None  # routed experts' non-weight quantizers only
    pool_key: tuple | None = None  # (expert module, quantizer path): experts sharing a pool
    always_pooled: bool = False  # one quantizer for all local experts (grouped layers)


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


def check_finite(items: list[SyncItem], group) -> None:
    """Raise on every rank if any rank saw a non-finite value (one collective, no hang).

    Each quantizer contributes the 1-based index of its first bad batch (0 if none; read from
    the device once per quantizer, after the loop); after a MAX over ``group`` (the whole job)
    every rank knows about every bad quantizer and raises the same error, so no rank is left
    waiting in a collective. Weight quantizers collect once, from the weight itself: their
    message names the weight; the others name the calibration batch.
    """
    hits = [(i.name, i.role, int(i.quantizer.first_nonfinite_batch or 0)) for i in items]
    hits = [h for h in hits if h[2] > 0]
    # group=None means the default group (the whole job), as for every torch collective.
    # Gathered as objects, not reduced as one tensor: under pipeline parallelism each stage
    # has its own quantizers (a different list per stage), and every rank must still raise.
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, hits, group=group)
        hits = sorted({h for part in parts for h in part})
    weights = [name for name, role, _ in hits if role == "weight"]
    acts = [f"{name} at calibration batch {b}" for name, role, b in hits if role != "weight"]
    parts = []
    if weights:
        parts.append(f"non-finite weights (NaN/inf): {_first_five(weights)}")
    if acts:
        parts.append(f"non-finite activations (NaN/inf) during calibration: {_first_five(acts)}")
    if parts:
        raise FloatingPointError(
            f"{'; '.join(parts)}. Check the model weights and inputs in float32, or exclude "
            "these layers in the recipe."
        )


def _first_five(names: list[str]) -> str:
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return "; ".join(names[:5]) + more


def _reduce_by_group(amaxes: list, items: list[SyncItem], group_of) -> None:
    """MAX-reduce ``amaxes[k]`` over ``group_of(items[k])`` (None: skip), one collective per
    group; buckets follow first appearance, which is the same on every rank."""
    buckets: dict[int, tuple[object, list[int]]] = {}
    for k, item in enumerate(items):
        group = group_of(item)
        if group is not None:
            buckets.setdefault(id(group), (group, []))[1].append(k)
    for group, idx in buckets.values():
        for k, r in zip(idx, all_reduce_flat([amaxes[k] for k in idx], group)):
            amaxes[k] = r


def _expert_pools(items: list[SyncItem], amaxes: list) -> dict:
    """MAX over local experts per pool key, then over each key's EP group (see docstring)."""
    pools: dict[tuple, torch.Tensor] = {}
    for item, amax in zip(items, amaxes):
        if item.pool_key is not None:
            prev = pools.get(item.pool_key)
            pools[item.pool_key] = amax if prev is None else torch.maximum(prev, amax)
    keys = list(pools)
    firsts = [next(i for i in items if i.pool_key == key) for key in keys]
    values = [pools[key] for key in keys]
    _reduce_by_group(values, firsts, lambda i: i.ep_group)
    return dict(zip(keys, values))


def sync_all(items: list[SyncItem], *, share_expert_inputs: bool = False
             ) -> tuple[list[torch.Tensor], list[str]]:
    """Synchronised amax per item (dense and expert rules of the module docstring), and the
    names of expert quantizers that saw no token anywhere and took their layer's pool."""
    amaxes = [_local_amax(i) for i in items]
    _reduce_by_group(amaxes, items, lambda i: i.tp_group if tp_reduced(i) else None)
    _reduce_by_group(amaxes, items, lambda i: i.dp_group)
    pools = _expert_pools(items, amaxes)
    empty = []
    for k, item in enumerate(items):
        if item.pool_key is None:
            continue
        if share_expert_inputs or item.always_pooled:
            amaxes[k] = pools[item.pool_key]
        elif not bool((amaxes[k] != 0).any()):
            amaxes[k] = pools[item.pool_key]
            empty.append(item.name)
    return amaxes, empty
