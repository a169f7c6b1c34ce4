"""Max calibration of a converted model: weights from themselves, activations from a forward loop.

The steps, identical on every rank (so the collectives line up whatever the data did):

1. Every static quantizer whose format has an amax enters ``calibrate`` mode. Weight quantizers
   collect straight from their layer's weight tensors, so every weight (including an MoE expert
   that never receives a token) gets an amax without any data, and then sit out the loop.
2. All other quantizers are switched off for the loop, so activation statistics are those of the
   unquantized model (ModelOpt's convention).
3. ``forward_loop(model)`` runs the calibration batches, unless only weights need statistics.
4. Non-finite values seen on any rank raise on every rank (:func:`sync.check_finite`).
5. amax values are MAX-reduced over the TP and DP groups by the rules in :mod:`megaquant.calib.sync`
   and stored; quantizers return to their configured modes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from megaquant.calib.sync import SyncItem, check_finite, sync_amax
from megaquant.nn.base import QuantModuleMixin


def _plan(model: nn.Module):
    """Items to calibrate (with their TP group) and the modes to restore afterwards."""
    items, groups, restore = [], [], {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantModuleMixin):
            continue
        weights = {}
        for qname, role, q in layer.quantizers():
            restore[q] = q.mode
            if not (q.mode == "static" and q.fmt.needs_amax):
                q.mode = "off"
                continue
            q.configure(q.fmt, "calibrate")
            shape = None
            if role == "weight":
                tensors = weights.setdefault(role, layer.calib_tensors(role))
                index = int(qname.split(".")[1]) if "." in qname else 0
                if tensors:
                    shape = tensors[index].shape
                    q.collect(tensors[index])
                    # Collected once from the tensor itself; the loop need not recompute it
                    # on every forward (the calibrator keeps the statistic while off).
                    q.mode = "off"
            axis = layer.partition_axes.get(role)
            items.append(SyncItem(f"{name}.{qname}", q, axis, shape, role))
            groups.append(getattr(layer, "tp_group", None))
    return items, groups, restore


def calibrate(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], None] | None,
    *,
    dp_group=None,
    world_group=None,
) -> dict:
    """Calibrate every static quantizer of ``model``; returns a small report dict.

    ``dp_group``: the data-parallel group (None: no data parallelism). ``world_group``: the group
    over which a non-finite value anywhere must stop everyone (None: the default group).
    """
    items, tp_groups, restore = _plan(model)
    needs_data = any(i.role != "weight" for i in items)
    if needs_data:
        if forward_loop is None:
            raise ValueError("this recipe calibrates activations: pass a forward_loop(model)")
        with torch.no_grad():
            forward_loop(model)
    check_finite(items, world_group)
    # Items are bucketed by their layer's TP group (experts may use an expert-TP group); every
    # rank sees the same layers in the same order, so the buckets and their order agree.
    buckets: dict[int, list[int]] = {}
    for k, g in enumerate(tp_groups):
        buckets.setdefault(id(g), []).append(k)
    for idx in buckets.values():
        amaxes = sync_amax([items[k] for k in idx], tp_groups[idx[0]], dp_group)
        for k, amax in zip(idx, amaxes):
            items[k].quantizer.load_amax(amax)
    for q, mode in restore.items():
        q.calibrator, q.mode = None, mode
    return {"calibrated_quantizers": len(items), "used_forward_loop": needs_data}



def prime_amax(model: nn.Module) -> int:
    """Give every static quantizer an amax of the right shape (zeros) so a checkpoint can fill it.

    Loading a distributed checkpoint needs the target tensors to exist with their final shapes;
    a freshly converted model has empty amax buffers. Weight amax shapes come from the weights,
    activation amax is per tensor. Returns the number of quantizers primed.
    """
    n = 0
    for layer in model.modules():
        if not isinstance(layer, QuantModuleMixin):
            continue
        for qname, role, q in layer.quantizers():
            if q.mode != "static" or not q.fmt.needs_amax or q.has_amax:
                continue
            tensors = layer.calib_tensors(role)
            if tensors:
                index = int(qname.split(".")[1]) if "." in qname else 0
                q.load_amax(q.fmt.compute_amax(torch.zeros_like(tensors[index])))
            elif getattr(q.fmt, "axis", None) is None:
                q.load_amax(torch.zeros(()))
            else:
                raise NotImplementedError(f"{q.name}: cannot restore a per-channel activation amax")
            n += 1
    return n
