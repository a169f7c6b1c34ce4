"""Read the Megatron-Bridge / NeMo extension points megaquant relies on with ``ast`` (no import).

A release is read from a wheel (``pip download --no-deps --only-binary :all: --python-version
3.12 megatron-bridge==X``), an unzipped tree or an installed package directory, so every release
can be checked on a CPU machine that could not import it (Bridge needs Transformer Engine and
Python 3.12; NeMo 2 needs Lightning and more). What is read:

Megatron-Bridge (``megatron/bridge/...``)
  * signatures: ``ModelProviderMixin.register_pre_wrap_hook`` / ``register_post_wrap_hook`` /
    ``provide_distributed_model``, ``get_model``, ``AutoBridge.to_megatron_provider`` /
    ``export_hf_weights_quant`` (0.5+), ``save_megatron_model``, ``pretrain``;
  * orders, as the first line each event appears on: in ``get_model`` model build ->
    pre-wrap hook -> GPU move -> Float16Module -> DDP; in ``training/setup.py``'s ``setup`` hook
    registration -> model build -> optimizer -> checkpoint load;
  * facts: the provider chains hooks with no ``None`` check, ``setup`` registers on a
    ``pre_wrap_hooks`` list by duck typing (0.5+), ``to_megatron_provider`` loads HF weights
    through a pre-wrap hook.

NeMo 2 (``nemo/...``): whether ``nemo.collections.llm`` exists, the ``ModelTransform`` callback's
methods and whether it calls ``self.model_transform(trainer.model)``, ``llm.ptq``'s signature.
"""

from __future__ import annotations

import ast
import re
import zipfile
from pathlib import Path
from typing import Any

BRIDGE = "megatron/bridge/"
GET_MODEL_EVENTS = {"_create_model": "build", "pre_wrap_hook": "pre_wrap_hook",
                    "hook": "pre_wrap_hook", "cuda": "to_gpu",
                    "mixed_precision_wrapper": "float16_module",
                    "_apply_mixed_precision_wrapper": "float16_module",
                    "Float16Module": "float16_module", "_ddp_wrap": "ddp",
                    "DistributedDataParallel": "ddp"}
SETUP_EVENTS = {"register_pre_wrap_hook": "register_hooks",
                "_register_pre_wrap_hook": "register_hooks",
                "provide_distributed_model": "build_model",
                "_build_distributed_model": "build_model", "get_model": "build_model",
                "setup_optimizer": "optimizer", "load_checkpoint": "checkpoint_load",
                "checkpoint_manager.load": "checkpoint_load"}


class Tree:
    """Files of a wheel, an unzipped tree or a site-packages directory, read on demand."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._zip = zipfile.ZipFile(self.root) if self.root.is_file() else None
        self._names = set(self._zip.namelist()) if self._zip else None

    def exists(self, path: str) -> bool:
        return path in self._names if self._zip else (self.root / path).is_file()

    def text(self, path: str) -> str | None:
        if not self.exists(path):
            return None
        if self._zip:
            return self._zip.read(path).decode("utf-8", "replace")
        return (self.root / path).read_text("utf-8", "replace")

    def version(self, dist: str) -> str | None:
        """The ``Version:`` of ``dist``'s METADATA in a wheel or site-packages, else None."""
        norm = dist.replace("-", "_").lower()
        names = self._names if self._zip else {
            f"{d.name}/METADATA" for d in self.root.glob("*.dist-info")}
        for name in sorted(names):
            parts = name.split("/")
            if (len(parts) == 2 and parts[1] == "METADATA"
                    and parts[0].lower().startswith(norm + "-")):
                m = re.search(r"^Version:\s*(\S+)", self.text(name) or "", re.MULTILINE)
                return m.group(1) if m else None
        return None

    def module(self, path: str) -> ast.Module | None:
        text = self.text(path)
        return ast.parse(text) if text is not None else None


def _params(fn: ast.FunctionDef) -> list[str]:
    """``["self", "hook", "prepend=False", "*", "cpu=False"]``: names with their defaults."""
    a = fn.args
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    out = [p.arg if d is None else f"{p.arg}={ast.unparse(d)}" for p, d in zip(pos, defaults)]
    if a.vararg:
        out.append(f"*{a.vararg.arg}")
    elif a.kwonlyargs:
        out.append("*")
    out += [p.arg if d is None else f"{p.arg}={ast.unparse(d)}"
            for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append(f"**{a.kwarg.arg}")
    return out


def _find(tree: ast.AST | None, name: str, cls: str | None = None) -> ast.FunctionDef | None:
    if tree is None:
        return None
    scope: ast.AST = tree
    if cls is not None:
        scope = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls),
                     None)
        if scope is None:
            return None
    for node in scope.body if cls is not None else ast.walk(scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def _call_name(call: ast.Call) -> list[str]:
    """``foo`` for ``foo(...)``; ``bar`` and ``obj.bar`` for ``obj.bar(...)``."""
    f = call.func
    if isinstance(f, ast.Name):
        return [f.id]
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else None
        return [f.attr] + ([f"{base}.{f.attr}"] if base else [])
    return []


def event_order(fn: ast.FunctionDef | None, events: dict[str, str]) -> list[str]:
    """The events of ``fn`` ordered by the first line each appears on (calls only)."""
    if fn is None:
        return []
    first: dict[str, int] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            for name in _call_name(node):
                if name in events:
                    ev = events[name]
                    first[ev] = min(first.get(ev, node.lineno), node.lineno)
    return sorted(first, key=first.get)


def _chain_checks_none(prop: ast.FunctionDef | None) -> bool | None:
    """Does the composed-hook loop of ``pre_wrap_hook`` test the hook's result for None?"""
    if prop is None:
        return None
    loops = [n for n in ast.walk(prop) if isinstance(n, ast.For)
             and any(isinstance(c, ast.Call) and _call_name(c)[:1] == ["hook"]
                     for c in ast.walk(n))]
    if not loops:
        return None
    return any(isinstance(c, ast.Compare) and any(isinstance(o, (ast.IsNot, ast.Is)) for o in c.ops)
               for loop in loops for c in ast.walk(loop))


def _calls_in(fn: ast.FunctionDef | None, name: str) -> bool:
    return fn is not None and any(isinstance(n, ast.Call) and name in _call_name(n)
                                  for n in ast.walk(fn))


def _appends_to(fn: ast.FunctionDef | None, attr: str) -> bool:
    """Does ``fn`` call ``<x>.<attr>.append(...)`` (the duck-typed ``pre_wrap_hooks`` list)?"""
    return fn is not None and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "append"
        and isinstance(n.func.value, ast.Attribute) and n.func.value.attr == attr
        for n in ast.walk(fn))


def _sig(fn: ast.FunctionDef | None) -> list[str] | None:
    return _params(fn) if fn is not None else None


def read_bridge(root: str | Path) -> dict[str, Any]:
    """The contract entry of one Megatron-Bridge release (see the module docstring)."""
    t = Tree(root)
    provider = t.module(BRIDGE + "models/model_provider.py")
    setup_mod = t.module(BRIDGE + "training/setup.py")
    auto = t.module(BRIDGE + "models/conversion/auto_bridge.py")
    if provider is None:
        raise FileNotFoundError(f"{root}: {BRIDGE}models/model_provider.py not found: not a "
                                "megatron-bridge wheel or tree")
    mixin = "ModelProviderMixin"
    to_provider = _find(auto, "to_megatron_provider", "AutoBridge")
    save = t.module(BRIDGE + "training/model_load_save.py")
    pretrain = t.module(BRIDGE + "training/pretrain.py")
    functions = {  # signature key -> (module, function, class)
        f"{mixin}.register_pre_wrap_hook": (provider, "register_pre_wrap_hook", mixin),
        f"{mixin}.register_post_wrap_hook": (provider, "register_post_wrap_hook", mixin),
        f"{mixin}.provide_distributed_model": (provider, "provide_distributed_model", mixin),
        "get_model": (provider, "get_model", None),
        "AutoBridge.to_megatron_provider": (auto, "to_megatron_provider", "AutoBridge"),
        "AutoBridge.export_hf_weights_quant": (auto, "export_hf_weights_quant", "AutoBridge"),
        "save_megatron_model": (save, "save_megatron_model", None),
        "pretrain": (pretrain, "pretrain", None),
    }
    register = _find(setup_mod, "_register_pre_wrap_hook")
    return {
        "version": t.version("megatron_bridge"),
        "signatures": {key: _sig(_find(*where)) for key, where in functions.items()},
        "get_model_order": event_order(_find(provider, "get_model"), GET_MODEL_EVENTS),
        "setup_order": event_order(_find(setup_mod, "setup"), SETUP_EVENTS),
        "provider_chain_checks_none": _chain_checks_none(_find(provider, "pre_wrap_hook", mixin)),
        "setup_registers_on_hook_list": _appends_to(register, "pre_wrap_hooks"),
        "hf_weights_loaded_by_pre_wrap_hook": _calls_in(to_provider, "register_pre_wrap_hook"),
    }


def read_nemo(root: str | Path) -> dict[str, Any]:
    """The contract entry of one nemo-toolkit release (see the module docstring)."""
    t = Tree(root)
    mt = t.module("nemo/lightning/pytorch/callbacks/model_transform.py")
    cls = "ModelTransform"
    apply = _find(mt, "apply_transform", cls)
    methods = None
    if mt is not None:
        node = next((n for n in ast.walk(mt) if isinstance(n, ast.ClassDef) and n.name == cls),
                    None)
        if node is not None:
            methods = sorted(n.name for n in node.body if isinstance(n, ast.FunctionDef))
    return {
        "version": t.version("nemo_toolkit"),
        "has_llm_collection": t.exists("nemo/collections/llm/__init__.py"),
        "model_transform_methods": methods,
        "apply_transform_calls_model_transform": _calls_in(apply, "self.model_transform"),
        "signatures": {
            "ModelTransform.apply_transform": _sig(apply),
            "llm.ptq": _sig(_find(t.module("nemo/collections/llm/api.py"), "ptq")),
        },
    }
