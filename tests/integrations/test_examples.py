"""The Bridge / NeMo examples cannot run here (they need CUDA and the frameworks): check that
they parse, that every megaquant name they import exists, and, with ``MEGAQUANT_BRIDGE_WHEELS``
set, that every Megatron-Bridge name they import is defined in the oldest and newest wheel."""

import ast
import importlib
import os
from pathlib import Path

import pytest

from megaquant.integrations.contract import recorded_range
from megaquant.integrations.source import Tree

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]


def test_examples_import_existing_megaquant_names():
    assert {p.name for p in EXAMPLES} >= {"bridge_ptq.py", "bridge_qat.py", "nemo_qat.py"}
    for path in EXAMPLES:
        for module, names in _imports(path):
            if module.startswith("megaquant"):
                mod = importlib.import_module(module)
                for name in names:
                    assert hasattr(mod, name), (path.name, module, name)


@pytest.mark.skipif(not os.environ.get("MEGAQUANT_BRIDGE_WHEELS"),
                    reason="set MEGAQUANT_BRIDGE_WHEELS=DIR to check the Bridge names")
def test_examples_import_names_every_bridge_release_defines():
    wheels = Path(os.environ["MEGAQUANT_BRIDGE_WHEELS"])
    for version in recorded_range("megatron-bridge"):
        tree = Tree(wheels / f"megatron_bridge-{version}-py3-none-any.whl")
        for path in EXAMPLES:
            for module, names in _imports(path):
                if not module.startswith("megatron.bridge"):
                    continue
                base = module.replace(".", "/")
                src = tree.text(f"{base}.py") or tree.text(f"{base}/__init__.py")
                assert src is not None, (version, path.name, module)
                for name in names:
                    assert name in src, (version, path.name, module, name)
