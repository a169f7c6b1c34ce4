"""Number formats: pure-torch numerics of FP8, NVFP4, MXFP8, MXFP4, INT8 and INT4.

Each format is a frozen dataclass (``NVFP4(block_size=16)``) with ``quantize`` (codes + scales, what
an exporter writes), ``dequantize`` and ``fake_quantize`` (their composition, bit-exactly, with a
straight-through gradient). ``get_format("nvfp4", block_size=16)`` looks one up by name.
Layouts and rounding rules: ``docs/formats.md``. This package never imports torch.distributed.
"""

from __future__ import annotations

from megaquant.formats.base import QuantFormat, QuantizedTensor, field_names
from megaquant.formats.fp8 import FP8
from megaquant.formats.integer import INT4, INT8
from megaquant.formats.mx import MXFP4, MXFP8
from megaquant.formats.nvfp4 import NVFP4

FORMATS: dict[str, type[QuantFormat]] = {cls.name: cls
                                         for cls in (FP8, NVFP4, MXFP8, MXFP4, INT8, INT4)}


def get_format(name: str, **options) -> QuantFormat:
    """Build a format by registry name; unknown names/options raise ValueError naming valid ones."""
    if name not in FORMATS:
        raise ValueError(f"unknown quantization format {name!r}; valid names: {sorted(FORMATS)}.")
    cls = FORMATS[name]
    unknown = sorted(set(options) - set(field_names(cls)))
    if unknown:
        raise ValueError(
            f"format {name!r} has no option(s) {unknown}; valid options: {field_names(cls)}."
        )
    return cls(**options)


__all__ = ["QuantFormat", "QuantizedTensor", "get_format", "FORMATS",
           "FP8", "NVFP4", "MXFP8", "MXFP4", "INT8", "INT4"]
