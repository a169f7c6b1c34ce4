"""megaquant: quantization (PTQ and QAT) for Megatron-Core models.

Numerics live in :mod:`megaquant.formats`, the fake-quant module in :mod:`megaquant.quantizer`,
Megatron integration in :mod:`megaquant.nn`, :mod:`megaquant.spec` and :mod:`megaquant.convert`.
"""

__version__ = "0.1.0"
