"""Resolve operand positions from the TE installed in this process (needs TE importable).

Used at conversion time by :mod:`megaquant.nn.te_layers` (so an incompatible TE fails before
training starts) and by ``megaquant doctor``. The signature is always read from the *original*
function (:func:`megaquant.te.patching.original_forward`), even while a patch is active.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from megaquant.te.patching import original_forward
from megaquant.te.signatures import FunctionSignature, OperandPositions, resolve
from megaquant.te.targets import TETarget

# The TE python package has been published under both names.
_DISTRIBUTIONS = ("transformer-engine", "transformer_engine", "transformer-engine-torch")


def te_version() -> str:
    """Installed TE version, from package metadata, else ``transformer_engine.__version__``."""
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import transformer_engine  # only reached where TE is importable

    return str(getattr(transformer_engine, "__version__", "unknown"))


def te_module(target: TETarget) -> ModuleType:
    """The TE module that defines ``target.function`` (imports TE)."""
    return importlib.import_module(target.module)


def resolve_live(
    target: TETarget, namespace: ModuleType | None = None, version: str | None = None
) -> OperandPositions:
    """Positions of ``target``'s operands in the live TE (or in ``namespace``: test doubles)."""
    namespace = te_module(target) if namespace is None else namespace
    version = version or te_version()
    signature = FunctionSignature.from_callable(original_forward(namespace, target.function))
    return resolve(target, signature, version)
