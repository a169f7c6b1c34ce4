"""Read TE's autograd-function signatures and call sites from source, with ``ast``, no import.

TE's torch extension needs CUDA, so on CPU machines TE cannot be imported. Its Python sources
can still be read: every ``transformer-engine`` py3-none-any wheel from 1.9.0.post1 on carries
them (unzip the wheel). This module extracts, per target (:mod:`megaquant.te.targets`):

* the signature of ``_X.forward`` (the same layout :func:`inspect.signature` would give);
* every call site of ``_X.apply`` / ``_X.forward`` in the defining file, with the argument
  expressions as the function receives them. TE builds these calls in three shapes, all
  handled here::

      fn = _X.apply; args = []            | fn = _X.apply; autograd_ctx = []
      fn = _X.forward; args = [None]      | fn = _X.forward; autograd_ctx = [None]
      args += (weight, inp, ...)          | out = fn(*autograd_ctx, weight, inp, ...)
      out = fn(*args)                     |
                                          | _X.apply(weight, inp, ...)  # 2.20: in _linear_eager

Used by ``scripts/te_signatures.py`` (the committed fixture) and ``megaquant doctor --te-src``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megaquant.te.signatures import FunctionSignature
from megaquant.te.targets import TARGETS, TETarget


@dataclass
class CallSite:
    """One call of ``_X.apply`` or ``_X.forward`` as written in TE's source."""

    caller: str  # qualified name of the enclosing function ("Linear.forward", "_linear_eager")
    mode: str  # "apply" or "forward"
    args: list[str]  # argument expressions in order; ctx placeholder first for "forward"
    called_from: list[str] = field(default_factory=list)  # callers of a module-level caller
    line: int = 0


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _qualname(node: ast.AST, parents: dict) -> tuple[str, ast.AST | None]:
    """Qualified name of the function enclosing ``node`` and that function's node."""
    names, func = [], None
    cur = parents.get(node)
    while cur is not None:
        if isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(cur.name)
            if func is None and not isinstance(cur, ast.ClassDef):
                func = cur
        cur = parents.get(cur)
    return ".".join(reversed(names)) or "<module>", func


def _find_class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    # Only a module-level class can be replaced by patching the module attribute.
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def read_signature(tree: ast.Module, target: TETarget) -> FunctionSignature:
    """The signature of ``target.function.forward`` as written in source."""
    cls = _find_class(tree, target.function)
    if cls is None:
        raise LookupError(f"no module-level class {target.function} in {target.source_path}")
    fwd = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    params = tuple(a.arg for a in fwd.args.posonlyargs + fwd.args.args)
    var = fwd.args.vararg.arg if fwd.args.vararg else None
    return FunctionSignature(params, var)


def _returns_tuple(tree: ast.Module, target: TETarget) -> bool:
    cls = _find_class(tree, target.function)
    fwd = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    returns = [n for n in ast.walk(fwd) if isinstance(n, ast.Return) and n.value is not None]
    return any(isinstance(r.value, ast.Tuple) for r in returns)


def _unpacked_fields(tree: ast.Module, target: TETarget) -> dict[str, list[str]]:
    """Parameters destructured in ``forward`` (``(m_splits, ...) = non_tensor_args``)."""
    cls = _find_class(tree, target.function)
    fwd = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    out = {}
    for node in fwd.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
            tgt = node.targets[0]
            if isinstance(tgt, (ast.Tuple, ast.List)):
                out[node.value.id] = [ast.unparse(e) for e in tgt.elts]
    return out


def _compiled_guards(tree: ast.Module, target: TETarget) -> list[str]:
    """Conditions under which the layer bypasses the function (2.20: a torch.compile custom op).

    Read from ``use_compiled_op = ...`` style assignments in ``<layer>.forward``; the patch
    cannot intercept that path, so megaquant refuses to run quantized under torch.compile.
    """
    layer = _find_class(tree, target.layer)
    if layer is None:
        return []
    fwd = next((n for n in layer.body
                if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)
    guards = []
    for node in ast.walk(fwd) if fwd else []:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if (node.targets[0].id.startswith("use_compiled")
                    and not isinstance(node.value, ast.Constant)):
                guards.append(ast.unparse(node.value))
    return guards


def _list_inits(block: list[ast.stmt]) -> dict[str, list[str]]:
    """``name = [a, b]`` statements in one block: the prefix lists (``args = [None]``)."""
    inits = {}
    for stmt in block:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.List):
            tgt = stmt.targets[0]
            if isinstance(tgt, ast.Name):
                inits[tgt.id] = [ast.unparse(e) for e in stmt.value.elts]
    return inits


def _expand(call: ast.Call, prefixes: dict[str, list[str]], func: ast.AST) -> list[str]:
    """Argument expressions of ``call`` with prefix lists and ``args += (...)`` expanded."""
    extended: dict[str, list[str]] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            if isinstance(node.value, (ast.Tuple, ast.List)):
                elts = [ast.unparse(e) for e in node.value.elts]
                extended.setdefault(node.target.id, []).extend(elts)
    out = []
    for arg in call.args:
        if isinstance(arg, ast.Starred) and isinstance(arg.value, ast.Name):
            name = arg.value.id
            if name in prefixes:
                out += prefixes[name] + extended.get(name, [])
                continue
        out.append(ast.unparse(arg))
    out += [f"{k.arg}={ast.unparse(k.value)}" for k in call.keywords]
    return out


def _callers_of(tree: ast.Module, name: str, parents: dict) -> list[str]:
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
    ]
    return sorted({_qualname(c, parents)[0] for c in calls})


def read_call_sites(tree: ast.Module, target: TETarget) -> list[CallSite]:
    """Every ``target.function.apply`` / ``.forward`` call in the defining module."""
    parents, sites = _parents(tree), []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in ("apply", "forward")):
            continue
        if not (isinstance(node.value, ast.Name) and node.value.id == target.function):
            continue
        caller, func = _qualname(node, parents)
        parent = parents[node]
        if isinstance(parent, ast.Call) and parent.func is node:
            args = _expand(parent, {}, func)
        elif isinstance(parent, ast.Assign) and isinstance(parent.targets[0], ast.Name):
            fn_name = parent.targets[0].id
            block = next(getattr(parents[parent], f) for f in ("body", "orelse")
                         if parent in getattr(parents[parent], f, []))
            calls = [
                n for n in ast.walk(func)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == fn_name
            ]
            assert len(calls) == 1, f"{caller}: expected one call of {fn_name}, got {len(calls)}"
            args = _expand(calls[0], _list_inits(block), func)
        else:
            continue  # a reference that is not a call (docs, super() chains)
        called_from = [] if "." in caller else _callers_of(tree, caller, parents)
        sites.append(CallSite(caller, node.attr, args, called_from, node.lineno))
    return sites


def bind_call(signature: FunctionSignature, site: CallSite) -> dict[str, str]:
    """Which argument expression each named parameter receives at ``site``.

    Binding stops at the first starred expression that precedes a named parameter (its length
    is unknown statically); everything after the named parameters goes to ``*args``.
    """
    params = signature.params if site.mode == "forward" else signature.params[1:]
    bound: dict[str, str] = {}
    for i, expr in enumerate(site.args):
        if "=" in expr and not expr.startswith("*") and re.match(r"^\w+=", expr):
            key, _, value = expr.partition("=")
            bound[key] = value
        elif i < len(params):
            if expr.startswith("*"):
                break
            bound[params[i]] = expr
        elif signature.var_positional:
            bound.setdefault("*" + signature.var_positional, "")
            sep = ", " if bound["*" + signature.var_positional] else ""
            bound["*" + signature.var_positional] += sep + expr
    return bound


def _operand_bindings(target: TETarget, sig: FunctionSignature, site: CallSite) -> dict:
    """The bindings worth recording: ctx, the operands, the optional names and ``*args``."""
    keep = {"ctx", *target.operands, *target.optional, f"*{sig.var_positional}"}
    return {k: v for k, v in bind_call(sig, site).items() if k in keep}


def te_version_of_tree(root: Path) -> str:
    """TE version of an unzipped wheel (dist-info METADATA) or a source checkout."""
    for meta in sorted(root.glob("transformer_engine-*.dist-info/METADATA")):
        for line in meta.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    for rel in ("build_tools/VERSION.txt", "transformer_engine/VERSION.txt", "VERSION.txt"):
        if (root / rel).is_file():
            return (root / rel).read_text().strip()
    return "unknown"


def read_tree(root: str | Path) -> dict[str, Any]:
    """Everything megaquant needs from one TE tree: version and, per target, signature + calls."""
    root = Path(root)
    if not (root / "transformer_engine").is_dir():
        raise ValueError(
            f"{root} has no transformer_engine/ folder; point at an unzipped transformer-engine "
            "wheel or a TE checkout (pip download --no-deps --only-binary :all: "
            "transformer-engine==X -d DIR && unzip DIR/*.whl -d DIR/src)"
        )
    result: dict[str, Any] = {"version": te_version_of_tree(root), "functions": {}}
    for target in TARGETS:
        path = root / target.source_path
        if not path.is_file():
            continue  # GroupedLinear arrived in 1.9; older trees simply lack it
        tree = ast.parse(path.read_text(), filename=str(path))
        sig = read_signature(tree, target)
        sites = read_call_sites(tree, target)
        result["functions"][target.function] = {
            "file": target.source_path,
            "params": list(sig.params),
            "var_positional": sig.var_positional,
            "returns_tuple": _returns_tuple(tree, target),
            "unpacked": _unpacked_fields(tree, target),
            "bypass_when": _compiled_guards(tree, target),
            "call_sites": [dict(asdict(s), bound=_operand_bindings(target, sig, s)) for s in sites],
        }
    return result
