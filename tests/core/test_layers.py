"""Imports point down only: every megaquant module imports modules of its own layer or below.

The layer table is STYLE.md's (docs/DESIGN.md shows it as a diagram). Imports are read with
``ast`` from the source, including imports inside functions (a lazy import is still a
dependency), so the check costs no import of torch or megatron. A module is placed by its
longest matching prefix; a new module that matches no prefix fails the test, so that whoever
adds it decides its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "megaquant"

# (module prefix, layer, what lives there). Lower layers never import higher ones.
LAYERS = [
    ("megaquant.formats", 0, "numerics"),
    ("megaquant.strict", 0, "strict config helper"),
    ("megaquant.util", 0, "rank-0 checks, atomic writes, flattened all-reduce"),
    ("megaquant.manifest", 0, "SHA-256 manifests of written directories"),
    ("megaquant.outdir", 0, "output-directory lock, staging and commit"),
    ("megaquant.transforms", 0, "Hadamard matrices and the online block transform"),
    ("megaquant.finite", 2, "finite checks of quantized weights and scales"),
    ("megaquant.calibrator", 1, "the quantizer's calibrator"),
    ("megaquant.quantizer", 1, "the fake-quant module"),
    ("megaquant.te", 2, "TE introspection and patching"),
    ("megaquant.megatron", 2, "CPU/gloo runtime, launch, checkpoints"),
    ("megaquant.nn", 3, "quantized layers and their registry"),
    ("megaquant.models", 4, "building and loading models"),
    ("megaquant.data", 4, "text"),
    ("megaquant.tokenizer", 4, "tokenizers"),
    ("megaquant.demo", 4, "what only the demo needs: GGUF, SmolLM2, Shakespeare, PyPI cache"),
    ("megaquant.recipe", 5, "recipes (and their calib: section)"),
    ("megaquant.recipe_calib", 5, "a recipe's calib: section"),
    ("megaquant.recipe_kv", 5, "a recipe's kv_cache: section"),
    ("megaquant.convert", 5, "in-place conversion"),
    ("megaquant.spec", 5, "spec providers"),
    ("megaquant.calib", 6, "calibration (max and the algorithms)"),
    ("megaquant.ptq", 7, "quantize = convert + configure + calibrate"),
    ("megaquant.export", 8, "deployable checkpoints"),
    ("megaquant.train", 8, "QAT/QAD"),
    ("megaquant.evaluate", 8, "evaluation"),
    ("megaquant.auto", 8, "mixed-precision search (uses ptq)"),
    ("megaquant.jobs", 9, "Hydra jobs"),
    ("megaquant.integrations", 9, "NeMo and other hooks"),
    ("megaquant.cli", 9, "the megaquant command"),
    ("megaquant.doctor", 9, "megaquant doctor"),
    ("megaquant.verify", 9, "megaquant verify"),
]
# Old paths kept for one release: they import their new home, wherever it sits.
SHIMS = {"megaquant.calib.max", "megaquant.calib.algorithms", "megaquant.te.layers",
         "megaquant.megatron.portable", "megaquant.models.gguf", "megaquant.models.smollm2",
         "megaquant.artifacts"}
# `import megaquant` reads __version__ only; the package's lazy `quantize` is the public facade.
ROOT_MODULE = "megaquant"


def layer_of(module: str) -> int:
    best = None
    for prefix, layer, _ in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS in {__file__} (and to the "
                       "table in docs/DESIGN.md)")
    return best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every megaquant import in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from megaquant.calib import mse` imports megaquant.calib.mse
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, m) for line, m in out if m == ROOT_MODULE or m.startswith("megaquant.")]


def resolve(module: str) -> str:
    """The importable module behind ``a.b.name`` (a name may be an attribute, not a module)."""
    parts = module.split(".")
    while parts:
        cand = ROOT.joinpath(*parts)
        if cand.with_suffix(".py").exists() or (cand / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    raise AssertionError(f"cannot resolve {module}")


def upward_in(path: Path, mod: str) -> list[str]:
    """The upward imports of one file, read as module ``mod``."""
    bad, own = [], layer_of(mod)
    for line, target in imports_of(path):
        target = resolve(target)
        if target != ROOT_MODULE and layer_of(target) > own:
            bad.append(f"{path.name}:{line}: {mod} (layer {own}) imports {target} "
                       f"(layer {layer_of(target)})")
    return bad


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        if mod not in (ROOT_MODULE, *SHIMS):
            bad += upward_in(path, mod)
    return bad


def test_layers_imports_point_down():
    bad = upward_imports()
    assert not bad, "upward imports (move the code down, or the import up):\n" + "\n".join(bad)


def test_layers_every_module_has_a_layer():
    for path in PKG.rglob("*.py"):
        if module_name(path) not in (ROOT_MODULE, *SHIMS):
            layer_of(module_name(path))  # raises naming the module


def test_layers_check_can_fail(tmp_path):
    # A formats module importing the quantizer, even lazily, must be reported.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from megaquant.quantizer import TensorQuantizer\n")
    bad = upward_in(probe, "megaquant.formats.probe")
    assert len(bad) == 1 and "megaquant.quantizer (layer 1)" in bad[0], bad
    assert upward_in(probe, "megaquant.calib.probe") == []


@pytest.mark.parametrize("shim", sorted(SHIMS))
def test_layers_shims_import(shim):
    __import__(shim)
