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
