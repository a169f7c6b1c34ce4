"""Strict construction of megaquant's own config dataclasses: unknown keys are errors.

One rule for every small config (recipes, quantizer and calibration options, the model, the
training blocks, the export job): a key the dataclass does not declare is a user mistake (a typo
would otherwise be ignored silently), so it is refused with a message naming the place and the
valid keys. Values are checked by each dataclass's own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def check_keys(values: Mapping[str, Any], cls: type, where: str, noun: str = "key") -> None:
    """Raise ValueError when ``values`` has keys that dataclass ``cls`` does not declare."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown {noun}(s) {unknown}; valid {noun}s: {valid}")


def from_dict(cls: type, values: Mapping[str, Any] | None, where: str):
    """``cls(**values)`` after :func:`check_keys` (None means all defaults)."""
    values = dict(values or {})
    check_keys(values, cls, where)
    return cls(**values)
