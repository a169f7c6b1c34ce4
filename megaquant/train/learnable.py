"""Learnable quantization scales for QAT/QAD: which scales, and how their gradients reduce.

:func:`enable_learnable_scales` turns the static amax of every quantizer whose format has one
(NVFP4's global amax, INT8/FP8's per-tensor or per-channel amax) into an ``nn.Parameter`` under
the same state-dict key, and, with ``per_block``, adds a ``block_amax`` parameter to every
NVFP4/INT4 *weight* quantizer (numerics: :mod:`megaquant.formats.lsq`). Because the learned
amax keeps its key, checkpoints, TP resharding and export read it exactly as a calibrated one;
``block_amax`` is TP-sharded with its weight.

Gradient reduction rules (applied by :func:`megaquant.train.optim.reduce_gradients`; each
scale parameter carries the marks Megatron's own params carry):

* **TP, shared scale** (a per-tensor amax, the same on every TP rank): each rank's backward
  only sees how *its* shard of the quantized tensor moved the loss, so the rank gradients are
  partial sums and are **summed over the TP group** (mark ``tp_grad_sum``). One exception: the
  input of a column-parallel linear without sequence parallelism is replicated over TP and the
  gradient reaching it is already all-reduced inside Megatron's linear (``allreduce_dgrad``):
  every rank then holds the full gradient and no sum is done (summing would count it tp times);
  nor for a layer that is not split over TP at all. Tested with Megatron's local linears; the
  TE layers follow the same partition axes but are not tested under TP on CPU.
* **TP, sharded scale** (``block_amax`` of a weight, or a per-channel amax along the weight's
  partition axis): rank-local like the weight shard itself; no TP sum; counted on every TP rank
  in the grad norm (``tensor_model_parallel`` / ``partition_dim`` as on the weight).
* **DP**: like every dense param: summed over the data-parallel group.
* **EP**: a routed expert's scales live only on its EP rank: marked ``allreduce=False`` like
  the expert's weight, so they are summed over the expert-data-parallel group, never over EP;
  their TP sum uses the expert-TP group.
* **PP**: nothing to add. PP never shares a layer: a scale lives with its layer on that
  layer's stage, gets its gradient from that stage's backward, and its square joins the
  stage's grad norm, which is summed over the pipeline group (``optim.grad_norm``).

The optimizer puts scale parameters (``quant_scale``) into their own AdamW group with no weight
decay and ``lr * lr_scale`` (the schedule scales both groups alike).
"""

from __future__ import annotations

from torch import nn

from megaquant.train.config import LearnableScalesConfig


def _tp_grad_sum(layer, role: str) -> bool:
    """Whether a shared scale's gradient on this layer and role is a TP partial sum.

    Not when the layer is not split over TP at all (no weight partition axis: every rank
    computes the whole layer and holds the whole gradient), nor for the replicated input of a
    column-parallel layer (weight split along outputs) without sequence parallelism, whose
    gradient Megatron's linear has already all-reduced. Everything else (split weights, split
    inputs, partial outputs, sequence-parallel inputs) is a partial sum.
    """
    w_axis = layer.partition_axes.get("weight")
    if w_axis is None:
        return False
    column = w_axis % 2 == 0
    return not (role == "input" and column and not getattr(layer, "sequence_parallel", False))


def _mark(param: nn.Parameter, layer, role: str, sharded_axis: int | None) -> None:
    weight = getattr(layer, "weight", None)
    param.quant_scale = True
    param.allreduce = getattr(weight, "allreduce", True)  # expert params: False under EP
    if sharded_axis is not None:
        param.tensor_model_parallel = True
        param.partition_dim = sharded_axis
        param.partition_stride = 1
        param.tp_grad_sum = False
    else:
        param.tensor_model_parallel = False
        param.tp_grad_sum = _tp_grad_sum(layer, role)


def enable_learnable_scales(model: nn.Module, cfg: LearnableScalesConfig) -> int:
    """Make the scales of every static quantizer of ``model`` learnable; returns how many.

    Call after calibration (or loading a PTQ checkpoint) and before building the optimizer
    and loading a train checkpoint. Quantizers whose format has nothing to learn at the chosen
    setting (INT4 activations, MX formats) raise the format's error naming the quantizer.
    """
    from megaquant.nn.base import QuantModuleMixin, sharded_amax_axis

    if not cfg.enabled:
        return 0
    count = 0
    for lname, layer in model.named_modules():
        if not isinstance(layer, QuantModuleMixin):
            continue
        for qname, role, q in layer.quantizers():
            if q.mode != "static" or q.learnable:
                continue
            if role != "weight" and q.fmt.name == "int4":
                continue  # INT4 activations: block scales from the data, nothing to learn
            blocky = q.fmt.name in ("nvfp4", "int4")
            weight = layer.weight if cfg.per_block and role == "weight" and blocky else None
            q.name = q.name or f"{lname}.{qname}"
            q.make_learnable(weight)
            axis = layer.partition_axes.get(role)
            if q.fmt.needs_amax:
                _mark(q.amax, layer, role, sharded_amax_axis(q.fmt, axis, q.amax.dim()))
            if weight is not None:
                _mark(q.block_amax, layer, role, None if axis is None else axis % weight.dim())
            count += 1
    if count == 0:
        raise ValueError("model.learnable_scales.enabled but no static quantizer has a scale to "
                         "learn; quantize the model with a recipe first (nvfp4, int4_w4a16, ...)")
    return count


def check_resume(record: dict, cfg: LearnableScalesConfig, directory) -> None:
    """Refuse to resume a checkpoint saved with other learnable-scale settings.

    ``enabled``/``per_block`` decide which state exists (``amax`` as a parameter with AdamW
    moments, ``block_amax``): a mismatch would fail deep in the loader, or silently drop state.
    ``record``: the checkpoint's ``megaquant.json``. Checkpoints from before learnable scales
    carry no entry and count as ``enabled: false``.
    """
    saved = (record.get("metadata") or {}).get("learnable_scales") or {}
    want = {"enabled": cfg.enabled, "per_block": cfg.per_block and cfg.enabled}
    got = {"enabled": bool(saved.get("enabled", False)),
           "per_block": bool(saved.get("per_block", False)) and bool(saved.get("enabled"))}
    if got != want:
        raise ValueError(f"{directory} was trained with model.learnable_scales {got}, but this run "
                         f"sets {want}; use the checkpoint's settings to resume, or start in "
                         "another run.output_dir")
