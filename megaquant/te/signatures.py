"""Resolve where a TE autograd function takes its GEMM operands, by parameter *name*.

TE calls its autograd functions positionally: ``_Linear.apply(weight, inp, bias, ...)`` with
grad enabled, ``_Linear.forward(None, weight, inp, bias, ...)`` under ``no_grad`` (``None`` is a
placeholder for the autograd ``ctx``). Which position holds the input has changed repeatedly:

    1.x        _Linear.forward(ctx, weight, weight_fp8, inp, ...)
    2.0-2.14   _Linear.forward(ctx, weight, inp, bias, ...)
    2.15       _Linear.forward(ctx, weight, weight_workspace, inp, bias, non_tensor_args, ...)
    2.16+      _Linear.forward(ctx, weight, inp, bias, fwd_args)

So the positions are read from the signature of the function itself: from the live function
(:meth:`FunctionSignature.from_callable`) or from TE's source read with ``ast``
(:mod:`megaquant.te.source`). :func:`resolve` turns a signature into :class:`OperandPositions`
or fails with a :class:`TESignatureError` that names the version, function, missing name and
the names found, so an incompatible TE fails at conversion time rather than mid-training.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from megaquant.te.targets import TETarget


class TESignatureError(RuntimeError):
    """A TE build lacks a parameter megaquant needs; raised at conversion time."""


@dataclass(frozen=True)
class FunctionSignature:
    """The positional layout of ``_X.forward``: ``ctx`` first, then the named parameters.

    Attributes:
        params: positional parameter names in order, ``ctx`` included.
        var_positional: name of the ``*args`` parameter, or None.
    """

    params: tuple[str, ...]
    var_positional: str | None = None

    @classmethod
    def from_callable(cls, fn: Callable[..., Any]) -> "FunctionSignature":
        """Read the signature of a live function (pass the *original*, never a patch)."""
        sig = inspect.signature(fn)
        params, var = [], None
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                params.append(p.name)
            elif p.kind == p.VAR_POSITIONAL:
                var = p.name
        return cls(tuple(params), var)

    def names(self) -> list[str]:
        """Every parameter name, ``*args`` shown with its star (for error messages)."""
        return list(self.params) + ([f"*{self.var_positional}"] if self.var_positional else [])


@dataclass(frozen=True)
class OperandPositions:
    """Where each operand sits in a call of one TE function.

    ``positions`` index the ``forward`` parameters with ``ctx`` at 0; a call through ``apply``
    omits ``ctx``, so its argument index is one less (:meth:`arg_index`).
    """

    function: str
    te_version: str
    positions: dict[str, int]
    var_positional_start: int | None = None
    optional: dict[str, int] = field(default_factory=dict)
    params: tuple[str, ...] = ()

    def arg_index(self, name: str, *, has_ctx: bool) -> int:
        """Index of ``name`` in the positional args of a call (``has_ctx``: the forward path)."""
        return self.positions[name] - (0 if has_ctx else 1)

    def varargs_index(self, *, has_ctx: bool) -> int:
        """Index where ``*args`` starts in the positional args of a call."""
        assert self.var_positional_start is not None, f"{self.function} has no *args"
        return self.var_positional_start - (0 if has_ctx else 1)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (used by ``megaquant doctor``)."""
        return {
            "te_version": self.te_version,
            "operands": dict(self.positions),
            "optional": dict(self.optional),
            "varargs_start": self.var_positional_start,
            "params": list(self.params),
        }


def resolve(target: TETarget, signature: FunctionSignature, te_version: str) -> OperandPositions:
    """Find ``target``'s operands in ``signature`` by name, or raise :class:`TESignatureError`."""
    if not signature.params or signature.params[0] != "ctx":
        raise TESignatureError(
            f"TE {te_version}: {target.function}.forward does not start with 'ctx'; names found: "
            f"{signature.names()}. Is this the original function rather than a patch? "
            "Run `megaquant doctor` and report the output."
        )
    positions = {}
    for name in target.operands:
        if name not in signature.params:
            raise TESignatureError(
                f"TE {te_version}: {target.function}.forward has no parameter {name!r}; names "
                f"found: {signature.names()}. This TE release is not supported yet: see "
                "docs/te.md ('Adding a TE release')."
            )
        positions[name] = signature.params.index(name)
    var_start = None
    if target.weights_in_varargs:
        if signature.var_positional is None:
            raise TESignatureError(
                f"TE {te_version}: {target.function}.forward has no *args for the expert "
                f"weights; names found: {signature.names()}. See docs/te.md."
            )
        var_start = len(signature.params)
    optional = {n: signature.params.index(n) for n in target.optional if n in signature.params}
    return OperandPositions(
        target.function, te_version, positions, var_start, optional, signature.params
    )
