"""What every quantized layer shares: its quantizers, created the same way for both routes in.

A quantized layer is a plain subclass of the layer it quantizes (``QuantColumnParallelLinear``
subclasses ``ColumnParallelLinear``). It reaches a model by one of two routes:

* built by a spec (:mod:`megaquant.spec`): its ``__init__`` runs the parent's, then
  :meth:`QuantModuleMixin._setup_quantizers`;
* converted in place (:mod:`megaquant.convert`): ``module.__class__ = QuantCls`` on the built
  parent, then ``_setup_quantizers()``; weights, devices and hooks stay as they were.

Both end in the same state: ``input_quantizer``, ``weight_quantizer`` and ``output_quantizer``,
all off until a recipe configures them. Roles are read from the attribute names
(``<role>_quantizer``), which is how recipes address them.
"""

from __future__ import annotations

from megaquant.quantizer import TensorQuantizer

ROLES = ("input", "weight", "output")


def sharded_amax_axis(fmt, partition_axis: int | None, ndim: int) -> int | None:
    """The axis along which an amax is split over TP (None: the amax is shared by the group).

    Only a per-channel amax whose channel axis is the tensor's partition axis stays sharded.
    Checkpointing (below) describes the amax's shards with it, and calibration
    (megaquant.calib.sync) decides with it which amax is MAX-reduced over TP.
    """
    axis = getattr(fmt, "axis", None)
    if axis is None or partition_axis is None:
        return None
    return axis % ndim if axis % ndim == partition_axis % ndim else None


class QuantModuleMixin:
    """Mixin for quantized subclasses; see the module docstring."""

    def _setup_quantizers(self) -> None:
        for role in ROLES:
            setattr(self, f"{role}_quantizer", TensorQuantizer())
        # Megatron moves modules with .to()/.cuda(); a fresh buffer must follow the weights.
        weight = getattr(self, "weight", None)
        if weight is not None:
            self.to(device=weight.device)

    # Partition axis of each role's tensor in this layer under tensor parallelism (None: the
    # tensor is replicated, or split along a dimension no amax is taken over). Read by
    # megaquant.calib.sync to decide which amax is reduced over the TP group.
    partition_axes: dict = {"input": None, "weight": None, "output": None}

    def calib_tensors(self, role: str) -> list:
        """Tensors a weight-like quantizer can calibrate from without data (one per quantizer)."""
        if role == "weight" and getattr(self, "weight", None) is not None:
            return [self.weight]
        return []

    def quantizers(self):
        """(attribute path, role, quantizer) for each quantizer of this layer."""
        for qname, q in self.named_modules():
            if isinstance(q, TensorQuantizer) and qname:
                yield qname, qname.split(".")[0].rsplit("_quantizer", 1)[0], q

    # True when the transformer layers of this layer's stack carry different quantizer states
    # (a mixed-precision recipe): its amax is then stored under a per-layer key instead of one
    # tensor stacked over layers. Set by megaquant.convert.apply_recipe; plain state otherwise.
    per_layer_amax: bool = False

    def _shard_quantizer_state(self, sharded: dict, prefix: str, sharded_offsets, metadata) -> dict:
        """Fix up the quantizer entries of a parent's ``sharded_state_dict`` result.

        The parent describes every extra buffer as replicated over TP, which is right for a
        per-tensor amax (TP ranks agree after calibration) but wrong for a per-channel amax
        split with the weight's output channels, and impossible for an amax that is still empty
        (uncalibrated or dynamic): those entries are dropped. A learned ``block_amax`` is split
        along the weight's partition axis.

        Megatron stacks every tensor of a transformer layer over layers (the first of
        ``sharded_offsets`` is ``(0, layer, num_layers)``), which needs every layer to hold an
        amax of the same shape. Where layers differ (``per_layer_amax``), the layer axis is
        dropped and the global layer index goes into the key (``....amax.layer3``) instead.
        """
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        groups = {"tp_group": self.tp_group, "dp_cp_group": (metadata or {}).get("dp_cp_group")}
        for qname, role, q in self.quantizers():
            # A learned per-block amax (megaquant.train.learnable) is split with its weight.
            blocks = getattr(q, "block_amax", None)
            if blocks is not None and self.partition_axes.get(role) is not None:
                self._shard_tp(sharded, f"{prefix}{qname}.block_amax", blocks,
                               self.partition_axes[role] % blocks.dim(), prefix, sharded_offsets,
                               metadata)
            key = f"{prefix}{qname}.amax"
            if key not in sharded:
                continue
            if not q.has_amax:
                del sharded[key]
                continue
            ckpt_key, offsets = key, tuple(sharded_offsets)
            if self.per_layer_amax and offsets:
                ckpt_key, offsets = per_layer_key(key, offsets)
            axis = sharded_amax_axis(q.fmt, self.partition_axes.get(role), q.amax.dim())
            if axis is None:
                if ckpt_key != key:
                    sharded[key] = make_sharded_tensor_for_checkpoint(
                        q.amax, ckpt_key, prepend_offsets=offsets, **groups)
                continue
            self._shard_tp(sharded, key, q.amax, axis, prefix, offsets, metadata,
                           ckpt_key=ckpt_key)
        return sharded

    def _shard_tp(self, sharded, key, tensor, axis, prefix, sharded_offsets, metadata, *,
                  ckpt_key: str | None = None) -> None:
        """Describe ``tensor`` as split over TP along ``axis`` (the parent said replicated),
        checkpointed under ``ckpt_key`` (default ``key``; a per-layer key when layers differ)."""
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

        sharded[key] = make_tp_sharded_tensor_for_checkpoint(
            tensor, ckpt_key or key, tp_axis=axis, prepend_offsets=sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )
        if axis == 0 and self._is_gated_fc1(prefix):
            # Each rank's fc1 rows are [gate_r; up_r]: describe the amax rows the way
            # Megatron's MLP describes the fc1 weight, or resharding would mix gate and up.
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)

    def _is_gated_fc1(self, prefix: str) -> bool:
        # The same test Megatron's MLP.sharded_state_dict applies to its fc1 weight.
        config = getattr(self, "config", None)
        return bool(getattr(config, "gated_linear_unit", False)) and prefix.endswith("linear_fc1.")


def per_layer_key(key: str, sharded_offsets: tuple) -> tuple[str, tuple]:
    """``(key with the global layer index, offsets without the layer axis)``.

    ``sharded_offsets[0]`` is the ``(axis 0, global layer, num_layers)`` entry a transformer
    block prepends; later entries (an expert's ``(axis, expert, num_experts)``) move up one axis.
    """
    axis, layer, _ = sharded_offsets[0]
    assert axis == 0, f"expected the layer axis first in {sharded_offsets}"
    rest = tuple((a - 1, off, size) for a, off, size in sharded_offsets[1:])
    return f"{key}.layer{layer}", rest
