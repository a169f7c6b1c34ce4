"""Strict construction of megaquant's own config dataclasses: unknown keys are errors.

One rule for every small config (recipes, quantizer and calibration options, the model, the
training blocks, the export job): a key the dataclass does not declare is a user mistake (a typo
would otherwise be ignored silently), so it is refused with a message naming the place and the
valid keys. Values are checked by each dataclass's own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import typing
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


def check_tree(values: Mapping[str, Any], cls: type, where: str = "") -> None:
    """Refuse keys anywhere in a nested mapping that the dataclass schema ``cls`` lacks.

    A field whose type is a dataclass is checked recursively; a free-form field (a dict, a
    recipe) may name the dataclass that validates it in ``metadata={"schema": ...}``. Used on
    Hydra job configs after composition: Hydra's ``+key=value`` adds keys even to a structured
    config, so a typo such as ``+parallel.tpp=2`` would otherwise be ignored.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            section = f"under {where!r}" if where else "at the top level"
            raise ValueError(f"unknown config key {path!r}; valid keys {section}: {list(fields)}")
        schema = fields[key].metadata.get("schema", hints[key])
        if dataclasses.is_dataclass(schema) and isinstance(value, Mapping):
            check_tree(value, schema, path)
