"""A stand-in for a TE autograd function that fake-quantizes the GEMM operands, then delegates.

During one quantized forward, ``_Linear`` (or ``_LayerNormLinear``, ``_GroupedLinear``) in TE's
module is replaced by a :class:`QuantizedTEFunction`. TE reaches it in one of two ways:

* grad enabled: ``_Linear.apply(weight, inp, ...)`` - no ctx argument;
* ``torch.no_grad()``: ``_Linear.forward(None, weight, inp, ...)`` - a ctx placeholder first.

Both land here. The operands are found by the positions that
:func:`megaquant.te.signatures.resolve` read from the *original* signature by name, replaced by
``quantizer(operand)``, and every other argument is passed through verbatim (same objects).
The result of the delegate is returned untouched: a tensor through 2.14, a tuple (output plus
workspaces) from 2.15.

Quantizing *outside* the autograd function is what makes this right for QAT too: autograd sees
``quantizer`` (straight-through estimator) and then TE's function, so TE's backward produces
gradients for the fake-quantized operands and the quantizer carries them to the real ones.

Inside its own ``forward`` TE may look the function up again as a module global
(``_GroupedLinear._make_grouped_tensor(...)`` in 2.20), which now finds this stand-in: every
attribute not defined here is forwarded to the delegate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

from megaquant.te.patching import patched
from megaquant.te.signatures import OperandPositions, TESignatureError

Quantizer = Callable[[Any], Any]


class QuantizedTEFunction:
    """Quantize named operands of one TE autograd function's call, then call ``delegate``.

    Args:
        delegate: what was in the module before the patch (the original ``_Linear`` or an outer
            patch); receives the call.
        positions: where the operands sit, resolved by name from the original signature.
        operand_quantizers: parameter name -> quantizer (``{"inp": ..., "weight": ...}``).
        weight_quantizers: grouped GEMMs only; quantizer ``i`` applies to the ``i``-th entry of
            ``*args`` (the expert weights come first there in every release; the count is the
            module's ``num_gemms``, never ``len(args)``: 1.x also passes fp8 copies and biases).
    """

    def __init__(
        self,
        delegate: Any,
        positions: OperandPositions,
        operand_quantizers: Mapping[str, Quantizer],
        weight_quantizers: Sequence[Quantizer] = (),
    ):
        self.delegate = delegate
        self.positions = positions
        self.operand_quantizers = dict(operand_quantizers)
        self.weight_quantizers = list(weight_quantizers)
        unknown = set(self.operand_quantizers) - set(positions.positions)
        assert not unknown, f"{positions.function}: no resolved position for {sorted(unknown)}"

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """The grad-enabled path: ``_X.apply(operands...)``, no ctx."""
        args, kwargs = self._quantize(args, kwargs, has_ctx=False)
        return self.delegate.apply(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The no-grad path: ``_X.forward(ctx_placeholder, operands...)``."""
        args, kwargs = self._quantize(args, kwargs, has_ctx=True)
        return self.delegate.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set in __init__: TE's static helpers on the class.
        if name == "delegate":
            raise AttributeError(name)
        return getattr(self.delegate, name)

    def _quantize(self, args: tuple, kwargs: dict, *, has_ctx: bool) -> tuple[list, dict]:
        args, kwargs = list(args), dict(kwargs)
        for name, quantizer in self.operand_quantizers.items():
            i = self.positions.arg_index(name, has_ctx=has_ctx)
            if name in kwargs:
                kwargs[name] = quantizer(kwargs[name])
            elif i < len(args):
                args[i] = quantizer(args[i])
            else:
                raise self._missing(name, len(args), has_ctx)
        if self.weight_quantizers:
            start = self.positions.varargs_index(has_ctx=has_ctx)
            if len(args) < start + len(self.weight_quantizers):
                raise self._missing("*weights", len(args), has_ctx)
            for j, quantizer in enumerate(self.weight_quantizers):
                args[start + j] = quantizer(args[start + j])
        return args, kwargs

    def _missing(self, name: str, n_args: int, has_ctx: bool) -> TESignatureError:
        path = "forward(ctx, ...)" if has_ctx else "apply(...)"
        return TESignatureError(
            f"TE {self.positions.te_version}: {self.positions.function}.{path} was called with "
            f"{n_args} positional arguments, too few to hold {name!r} (parameters: "
            f"{list(self.positions.params)}). TE no longer calls this function the way its "
            "signature says; run `megaquant doctor` and see docs/te.md."
        )


@contextmanager
def quantizing(
    namespace: Any,
    positions: OperandPositions,
    operand_quantizers: Mapping[str, Quantizer],
    weight_quantizers: Sequence[Quantizer] = (),
) -> Iterator[QuantizedTEFunction]:
    """Route ``namespace.<function>`` through a :class:`QuantizedTEFunction` inside the block.

    The stand-in delegates to whatever is there now (the original, or an outer patch), and the
    previous object is restored on every exit path (:func:`megaquant.te.patching.patched`).
    """
    name = positions.function
    wrapper = QuantizedTEFunction(
        getattr(namespace, name), positions, operand_quantizers, weight_quantizers
    )
    with patched(namespace, name, wrapper) as previous:
        assert previous is wrapper.delegate, f"{name} changed while being patched"
        yield wrapper
