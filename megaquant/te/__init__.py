"""Transformer Engine support that needs no TE: signature introspection and safe patching.

Nothing here imports TE at module import time, so all of it runs (and is tested) on CPU:

* :mod:`~megaquant.te.targets`    the TE autograd functions megaquant patches
* :mod:`~megaquant.te.signatures` operand positions resolved by parameter name
* :mod:`~megaquant.te.source`     the same, read from TE source trees with ``ast``
* :mod:`~megaquant.te.live`       the same, from the TE installed in this process
* :mod:`~megaquant.te.patching`   ``patched``: replace a module attribute, always restore it
* :mod:`~megaquant.te.wrapper`    the stand-in that fake-quantizes operands and delegates

The quantized TE layers that use these live in :mod:`megaquant.nn.te_layers` (needs TE).
"""

from megaquant.te.patching import original_of, patched
from megaquant.te.signatures import FunctionSignature, OperandPositions, TESignatureError, resolve
from megaquant.te.targets import GROUPED_LINEAR, LAYERNORM_LINEAR, LINEAR, TARGETS, TETarget
from megaquant.te.wrapper import QuantizedTEFunction, quantizing

__all__ = [
    "FunctionSignature", "GROUPED_LINEAR", "LAYERNORM_LINEAR", "LINEAR", "OperandPositions",
    "QuantizedTEFunction", "TARGETS", "TESignatureError", "TETarget", "original_of", "patched",
    "quantizing", "resolve",
]
