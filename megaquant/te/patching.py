"""Replace a module attribute for the length of a ``with`` block, and always put it back.

TE's layer ``forward`` looks up its autograd function (``_Linear``) as a module global at call
time, so ``with patched(te_linear_module, "_Linear", wrapper): layer(x)`` routes exactly that
call through ``wrapper``. Three guarantees:

* **restore on every exit path**: the previous value is put back in ``finally``, so an exception
  inside the block (an OOM, a shape error) leaves TE untouched;
* **nesting is safe**: each level restores what *it* replaced, so the outermost exit restores
  the true original whatever happened inside;
* **the original stays findable**: while any patch is active, :func:`original_of` returns the
  object that was there before the first one. Introspection must read the original: a wrapper,
  a ``functools.partial`` or a ``lambda *a, **k`` has signature ``(*args, **kwargs)`` and would
  hide every parameter name.

Not thread-safe by design: TE's module globals are process-wide, and a forward runs on one
thread. Patch only inside a forward, never at import time (docs/DESIGN.md, "Where a new piece
goes").
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator

# (id(namespace), attribute) -> (the original object, how many patches are active on it)
_ACTIVE: dict[tuple[int, str], tuple[Any, int]] = {}


@contextmanager
def patched(namespace: ModuleType | Any, name: str, replacement: Any) -> Iterator[Any]:
    """Set ``namespace.name = replacement`` inside the block; yields the replaced object.

    The yielded object is what the replacement should delegate to: the original, or an outer
    patch when nested (so patches compose instead of silently dropping each other).
    """
    if not hasattr(namespace, name):
        raise AttributeError(f"{getattr(namespace, '__name__', namespace)!r} "
                             f"has no {name!r} to patch")
    key = (id(namespace), name)
    previous = getattr(namespace, name)
    original, depth = _ACTIVE.get(key, (previous, 0))
    _ACTIVE[key] = (original, depth + 1)
    setattr(namespace, name, replacement)
    try:
        yield previous
    finally:
        setattr(namespace, name, previous)
        original, depth = _ACTIVE[key]
        if depth == 1:
            del _ACTIVE[key]
        else:
            _ACTIVE[key] = (original, depth - 1)


def original_of(namespace: ModuleType | Any, name: str) -> Any:
    """The attribute as it was before any active :func:`patched` block replaced it."""
    key = (id(namespace), name)
    if key in _ACTIVE:
        return _ACTIVE[key][0]
    return getattr(namespace, name)


def is_patched(namespace: ModuleType | Any, name: str) -> bool:
    """Whether a :func:`patched` block is active on ``namespace.name``."""
    return (id(namespace), name) in _ACTIVE


def original_forward(namespace: ModuleType | Any, name: str) -> Any:
    """``forward`` of the original autograd function, unwrapped of ``functools.wraps`` layers."""
    return inspect.unwrap(original_of(namespace, name).forward)
