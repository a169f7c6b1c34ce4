"""TE-shaped test doubles, one per TE release, built from the committed source fixture.

TE cannot be imported on CPU, so each release's calling protocol is reproduced from what
``scripts/te_signatures.py`` read out of that release's source:

* :func:`make_function` - a ``torch.autograd.Function`` whose ``forward`` has exactly that
  release's signature (``inspect.signature`` sees the real parameter names), records the
  arguments it receives, computes the GEMM from the operands it finds *by its own parameter
  names*, and returns a tuple from 2.15 on like TE does.
* :class:`FakeTELayer` - a module whose ``forward`` builds the call the way that release's
  ``Linear.forward`` does: it looks the function up as a module global at call time, uses
  ``.apply(...)`` with grad enabled and ``.forward(None, ...)`` under ``no_grad``, passes the
  argument expressions of the recorded call site (other values are unique sentinels), and for
  2.20 goes through a module-level ``_linear_eager`` like TE does.

Test-only: classes are generated here with ``type()`` (one per release); the library never
does this (STYLE.md habit 3).
"""

from __future__ import annotations

import inspect
import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "te_signatures.json"
RELEASES: dict = json.loads(FIXTURE.read_text())["versions"]
MODULES = {
    "_Linear": "transformer_engine.pytorch.module.linear",
    "_LayerNormLinear": "transformer_engine.pytorch.module.layernorm_linear",
    "_GroupedLinear": "transformer_engine.pytorch.module.grouped_linear",
}


class Sentinel:
    """A unique stand-in for a non-operand argument; quantizing it would raise."""

    def __init__(self, expr: str):
        self.expr = expr

    def __repr__(self) -> str:
        return f"<{self.expr}>"


def _signature(params: list[str], var: str | None) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    ps = [inspect.Parameter(p, kind) for p in params]
    if var:
        ps.append(inspect.Parameter(var, inspect.Parameter.VAR_POSITIONAL))
    return inspect.Signature(ps)


def _gemm(entry: dict, name: str, received: dict, num_gemms: int) -> torch.Tensor:
    """The GEMM the real function computes, from operands found by parameter name."""
    inp = received["inp"]
    if name == "_GroupedLinear":
        splits = received.get("m_splits")
        if splits is None:  # 2.10-2.16: m_splits travels inside the non_tensor_args tuple
            fields = entry["unpacked"]["non_tensor_args"]
            splits = received["non_tensor_args"][fields.index("m_splits")]
        weights = received["varargs"][:num_gemms]
        return torch.cat([c @ w.t() for c, w in zip(torch.split(inp, list(splits)), weights)])
    if name == "_LayerNormLinear":
        inp = F.layer_norm(inp, inp.shape[-1:], received["ln_weight"], received["ln_bias"])
    return inp @ received["weight"].t()


def make_function(version: str, name: str, num_gemms: int = 1) -> type:
    """The autograd-function double for ``name`` in TE ``version``; calls land in ``.calls``."""
    entry = RELEASES[version][name]
    params, var = entry["params"], entry["var_positional"]

    def forward(ctx, *args):
        received = dict(zip(params[1:], args))
        received["varargs"] = list(args[len(params) - 1:])
        received["ctx"] = ctx
        cls.calls.append({"args": list(args), "ctx": ctx, "grad": torch.is_grad_enabled()})
        out = _gemm(entry, name, received, num_gemms)
        if ctx is not None:  # the apply path: keep what backward needs
            ctx.n_args = len(args)
            ctx.w_index = params.index("weight") - 1 if "weight" in params else None
            ctx.save_for_backward(received["inp"], received.get("weight"))
        return (out, Sentinel("workspace")) if entry["returns_tuple"] else out

    def backward(ctx, grad_out, *_):
        x, w = ctx.saved_tensors
        grads = [None] * ctx.n_args
        grads[params.index("inp") - 1] = grad_out @ w
        grads[ctx.w_index] = grad_out.t() @ x
        return tuple(grads)

    forward.__signature__ = _signature(params, var)
    cls = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward), "calls": [],
        "_static_helper": staticmethod(lambda: "helper"),
    })
    return cls


def populate(ns, version: str, name: str, num_gemms: int = 1):
    """Define the double (and ``_linear_eager`` where that release has it) in module ``ns``."""
    setattr(ns, name, make_function(version, name, num_gemms))
    if uses_linear_eager(version, name):
        def _linear_eager(*args, is_grad_enabled):
            # Like TE 2.20: the global is looked up when called, so a patch intercepts it.
            fn = ns._Linear
            return fn.apply(*args) if is_grad_enabled else fn.forward(None, *args)
        ns._linear_eager = _linear_eager
    return ns


def uses_linear_eager(version: str, name: str) -> bool:
    return any(s["caller"] == "_linear_eager" for s in RELEASES[version][name]["call_sites"])


def make_namespace(version: str, name: str, num_gemms: int = 1) -> types.ModuleType:
    """A module like TE's that defines the double."""
    return populate(types.ModuleType(MODULES[name]), version, name, num_gemms)


class FakeTELayer(torch.nn.Module):
    """Calls the double the way ``<Layer>.forward`` of that TE release does."""

    def __init__(self, version: str, name: str, ns: types.ModuleType, values: dict):
        super().__init__()
        self.version, self.name, self.ns = version, name, ns
        self.entry = RELEASES[version][name]
        self.values = values  # argument expression -> value; unknown ones become Sentinels
        self.sentinels: dict[str, Sentinel] = {}

    def _value(self, expr: str):
        if expr in self.values:
            return self.values[expr]
        return self.sentinels.setdefault(expr, Sentinel(expr))

    def built_args(self, mode: str) -> list:
        """The positional arguments this release passes in ``mode`` (ctx placeholder first)."""
        site = next(s for s in self.entry["call_sites"] if s["mode"] == mode)
        args = []
        for expr in site["args"]:
            if expr.startswith("*"):
                args.extend(self.values.get(expr, [self._value(expr)]))
            else:
                args.append(None if expr == "None" else self._value(expr))
        return args

    def forward(self, x: torch.Tensor):
        self.values["inp"] = x
        mode = "apply" if torch.is_grad_enabled() else "forward"
        args = self.built_args(mode)
        if uses_linear_eager(self.version, self.name):
            call_args = args if mode == "apply" else args[1:]
            out = self.ns._linear_eager(*call_args, is_grad_enabled=mode == "apply")
        else:
            fn = getattr(self.ns, self.name)  # module global, looked up at call time
            out = fn.apply(*args) if mode == "apply" else fn.forward(*args)
        return out[0] if self.entry["returns_tuple"] else out


def grouped_values(version: str, weights: list, m_splits: list) -> dict:
    """Argument values for a grouped call site: weights, fp8 copies, biases, m_splits."""
    entry = RELEASES[version]["_GroupedLinear"]
    values = {
        "*weight_tensors": weights,
        "*weight_tensors_fp8": [Sentinel(f"w_fp8{i}") for i in range(len(weights))],
        "*bias_tensors": [Sentinel(f"bias{i}") for i in range(len(weights))],
        "m_splits": m_splits,
    }
    fields = entry["unpacked"].get("non_tensor_args")
    if fields:  # the m_splits slot of the tuple, other slots sentinels, like TE builds it
        values["non_tensor_args"] = tuple(
            m_splits if f == "m_splits" else Sentinel(f) for f in fields
        )
    return values
