"""The TE autograd functions megaquant patches, and what it needs from each.

Transformer Engine's layers (``te.pytorch.Linear``, ``LayerNormLinear``, ``GroupedLinear``) do
their fused work inside one ``torch.autograd.Function`` per layer type, defined at module level
in ``transformer_engine/pytorch/module/<file>.py``. The layer's ``forward`` looks that class up
as a module global at call time, so replacing the module attribute for the duration of one
forward intercepts the call (see :mod:`megaquant.te.patching`).

A target names the function, the module that holds it, and the parameters the wrapper must find
*by name* in the function's signature. Positions are never hard-coded: TE has moved them in
almost every minor release (see docs/te.md for the history).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TETarget:
    """One patchable TE autograd function.

    Attributes:
        function: class name in the TE module (``"_Linear"``).
        module: dotted module path that defines it and whose layer calls it.
        layer: the TE layer class whose ``forward`` calls it (``"Linear"``).
        operands: parameter names that must exist; the wrapper quantizes these.
        weights_in_varargs: the GEMM weights arrive as the leading entries of the function's
            ``*args`` (grouped GEMMs: one weight per expert, then biases or other tensors).
        optional: parameter names reported when present but not required (``m_splits``).
    """

    function: str
    module: str
    layer: str
    operands: tuple[str, ...]
    weights_in_varargs: bool = False
    optional: tuple[str, ...] = ()

    @property
    def source_path(self) -> str:
        """Path of the defining file inside a TE source tree or unzipped wheel."""
        return self.module.replace(".", "/") + ".py"


LINEAR = TETarget(
    function="_Linear",
    module="transformer_engine.pytorch.module.linear",
    layer="Linear",
    operands=("weight", "inp"),
)

# ``inp`` here is the *pre-norm* activation: the GEMM input is computed inside the fused
# function, so only ``weight`` is quantized on the fused route (see nn/te_layers.py).
LAYERNORM_LINEAR = TETarget(
    function="_LayerNormLinear",
    module="transformer_engine.pytorch.module.layernorm_linear",
    layer="LayerNormLinear",
    operands=("weight", "inp"),
    optional=("ln_weight",),
)

GROUPED_LINEAR = TETarget(
    function="_GroupedLinear",
    module="transformer_engine.pytorch.module.grouped_linear",
    layer="GroupedLinear",
    operands=("inp",),
    weights_in_varargs=True,
    optional=("m_splits", "non_tensor_args"),
)

TARGETS: tuple[TETarget, ...] = (LINEAR, LAYERNORM_LINEAR, GROUPED_LINEAR)
TARGETS_BY_FUNCTION = {t.function: t for t in TARGETS}
