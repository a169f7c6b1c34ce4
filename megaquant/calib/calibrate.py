"""Max calibration of a converted model: weights from themselves, activations from a forward loop.

The steps, identical on every rank (so the collectives line up whatever the data did):

1. Every static quantizer whose format has an amax enters ``calibrate`` mode. Weight quantizers
   collect straight from their layer's weight tensors, so every weight (including an MoE expert
   that never receives a token) gets an amax without any data, and then sit out the loop.
2. All other quantizers are switched off for the loop, so activation statistics are those of the
   unquantized model (ModelOpt's convention).
3. ``forward_loop(model)`` runs the calibration batches, unless only weights need statistics.
4. Non-finite values seen on any rank raise on every rank (:func:`sync.check_finite`).
5. amax values are MAX-reduced over the TP and DP groups (for routed experts: expert-TP,
   expert-DP and, for input scales only, EP) by the rules in :mod:`megaquant.calib.sync` and
   stored; quantizers return to their configured modes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from megaquant.calib.sync import SyncItem, check_finite, sync_all
from megaquant.nn.base import QuantModuleMixin


def _expert_owners(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Name of each routed-expert linear -> (name, module) of the experts module holding it.

    Experts modules (Megatron's ``SequentialMLP`` and ``TEGroupedMLP``) are recognised by their
    ``ep_group`` attribute and a ``local_experts`` list or grouped ``linear_fc1``.
    """
    owners = {}
    for name, module in model.named_modules():
        if getattr(module, "ep_group", None) is None or not (
                hasattr(module, "local_experts") or hasattr(module, "linear_fc1")):
            continue
        for sub_name, sub in module.named_modules():
            # Local linears say is_expert; TE grouped linears (num_gemms) are experts by nature.
            if sub_name and (getattr(sub, "is_expert", False) or hasattr(sub, "num_gemms")):
                owners[f"{name}.{sub_name}" if name else sub_name] = (name, module)
    return owners


def _groups_for(layer, name: str, qname: str, role: str, owner, groups: dict) -> dict:
    """The SyncItem group fields of one quantizer (rules in megaquant.calib.sync)."""
    fields = {"tp_group": getattr(layer, "tp_group", None), "dp_group": groups["dp"]}
    if owner is None:
        return fields
    owner_name, experts = owner
    fields["dp_group"] = groups["expert_dp"] or getattr(experts, "dp_group", None)
    if fields["dp_group"] is None and groups["dp"] is not None:
        raise ValueError(f"{owner_name} ({type(experts).__name__}) does not say its expert-data-"
                         "parallel group: pass calibrate(..., "
                         "expert_dp_group=groups.expt_dp_group)")
    if role != "weight":
        linear = name[len(owner_name):].lstrip(".").split(".")[-1]
        fields.update(ep_group=groups["ep"] or experts.ep_group,
                      pool_key=(owner_name, f"{linear}.{qname}"),
                      always_pooled=hasattr(layer, "num_gemms"))
    return fields


def _plan(model: nn.Module, groups: dict):
    """Items to calibrate (with their process groups) and the modes to restore afterwards."""
    items, restore = [], {}
    owners = _expert_owners(model)
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantModuleMixin):
            continue
        weights = {}
        for qname, role, q in layer.quantizers():
            restore[q] = q.mode
            if getattr(q, "fixed_amax", False):  # a fixed scale (kv_cache scale: unit)
                continue
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
            fields = _groups_for(layer, name, qname, role, owners.get(name), groups)
            items.append(SyncItem(f"{name}.{qname}", q, layer.partition_axes.get(role), shape,
                                  role, **fields))
    return items, restore


def calibrate(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], None] | None,
    *,
    dp_group=None,
    world_group=None,
    expert_dp_group=None,
    ep_group=None,
    share_expert_inputs: bool = False,
) -> dict:
    """Calibrate every static quantizer of ``model``; returns a small report dict.

    ``dp_group``: the data-parallel group of the dense layers (None: no data parallelism).
    ``world_group``: the group over which a non-finite value anywhere must stop everyone (None:
    the default group). Routed experts (MoE) reduce over their own groups, read from the module
    holding them (``SequentialMLP.dp_group`` is Megatron's expert-data-parallel group,
    ``.ep_group`` the expert-parallel one); ``expert_dp_group`` / ``ep_group`` override them.
    ``share_expert_inputs``: one input amax for all experts of a layer, across EP ranks (what a
    grouped GEMM with a single activation scale needs). See :mod:`megaquant.calib.sync`.
    """
    groups = {"dp": dp_group, "expert_dp": expert_dp_group, "ep": ep_group}
    items, restore = _plan(model, groups)
    needs_data = any(i.role != "weight" for i in items)
    if needs_data:
        if forward_loop is None:
            raise ValueError("this recipe calibrates activations: pass a forward_loop(model)")
        with torch.no_grad():
            forward_loop(model)
    check_finite(items, world_group)
    # Every rank has the same items in the same order (identically built models), so the
    # collectives inside sync_all line up whatever the routing did.
    amaxes, empty = sync_all(items, share_expert_inputs=share_expert_inputs)
    for item, amax in zip(items, amaxes):
        item.quantizer.load_amax(amax)
    for q, mode in restore.items():
        q.calibrator, q.mode = None, mode
    report = {"calibrated_quantizers": len(items), "used_forward_loop": needs_data}
    if any(i.pool_key is not None for i in items):
        report["expert_inputs_without_tokens"] = empty
    return report


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
