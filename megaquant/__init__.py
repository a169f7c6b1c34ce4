"""megaquant: quantization (PTQ and QAT) for Megatron-Core models.

Numerics live in :mod:`megaquant.formats`, the fake-quant module in :mod:`megaquant.quantizer`,
Megatron integration in :mod:`megaquant.nn`, :mod:`megaquant.spec` and :mod:`megaquant.convert`.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import megaquant` (or megaquant.formats) must not pull in megatron-core.
    if name == "quantize":
        from megaquant.ptq import quantize

        return quantize
    raise AttributeError(f"module 'megaquant' has no attribute {name!r}")
