"""The Megatron contract: the symbols megaquant uses exist, with the parameters it passes or
overrides, in every supported megatron-core release (fixture read from the wheels with ast)."""

import ast
import json
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from megaquant.megatron.contract import CONTRACT, SUPPORTED, installed_tree, problems, read_release

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "megatron_api.json").read_text())
RELEASES = FIXTURE["releases"]
SUPPORTED_RELEASES = [v for v in RELEASES if v in SpecifierSet(SUPPORTED)]


def referenced_megatron_names() -> set[str]:
    """Every megatron.core module/name megaquant's code imports, or reads off an imported module
    (Megatron-Bridge names, ``megatron.bridge``, belong to the Bridge contract in integrations/)."""
    uses = set()
    for path in (ROOT / "megaquant").rglob("*.py"):
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron.core"):
                for a in node.names:
                    uses.add(f"{node.module}.{a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("megatron.core"):
                        uses.add(a.name)
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                uses.add(f"{aliases[node.value.id]}.{node.attr}")
    return uses


def test_megatron_contract_lists_every_name_megaquant_references():
    listed = {u.path for u in CONTRACT}
    missing = sorted(referenced_megatron_names() - listed)
    assert not missing, f"add these to megaquant/megatron/contract.py CONTRACT: {missing}"


def test_megatron_contract_fixture_covers_the_contract():
    for version, release in RELEASES.items():
        assert set(release) == {u.path for u in CONTRACT}, (
            f"{version}: regenerate tests/fixtures/megatron_api.json (scripts/megatron_api.py)")


def test_megatron_contract_holds_in_every_supported_release():
    assert len(SUPPORTED_RELEASES) >= 2, SUPPORTED_RELEASES
    for version in SUPPORTED_RELEASES:
        assert problems(RELEASES[version], version) == []


def test_megatron_contract_range_is_honest():
    # The release just below the range breaks the contract (so the lower bound is needed), and
    # pyproject.toml declares exactly the contract's range.
    older = [v for v in RELEASES if v not in SUPPORTED_RELEASES]
    assert older and all(problems(RELEASES[v], v) for v in older)
    text = (ROOT / "pyproject.toml").read_text()
    req = next(Requirement(m) for m in re.findall(r'"(megatron-core[^"]*)"', text))
    assert req.specifier == SpecifierSet(SUPPORTED)


def test_megatron_contract_reports_a_changed_override():
    release = dict(RELEASES[SUPPORTED_RELEASES[-1]])
    path = "megatron.core.models.backends.BackendSpecProvider.grouped_mlp_modules"
    release[path] = ["moe_use_grouped_gemm"]
    release.pop("megatron.core.transformer.mlp.MLP")
    found = problems(release, "9.9")
    assert any(path in p and "overrides" in p for p in found), found
    assert any("mlp.MLP is missing" in p for p in found), found


def test_megatron_contract_installed_release_reads_like_its_fixture():
    from importlib.metadata import version

    installed = version("megatron-core")
    if installed not in RELEASES:
        pytest.skip(f"megatron-core {installed} is not in the fixture")
    live = read_release(installed_tree())
    assert problems(live, installed) == problems(RELEASES[installed], installed)
    for use in CONTRACT:  # the fixture trims non-exact lists to megaquant's parameters
        have, want = live[use.path], RELEASES[installed][use.path]
        assert (have is None) == (want is None), use.path
        if have is not None:
            assert [p for p in have if p in want] == want, use.path


def test_megatron_contract_doctor_reports_megatron(tmp_path, capsys):
    from megaquant import doctor

    report = doctor.collect(None, False)
    assert report["megatron"]["problems"] == [] and report["megatron"]["symbols"] == len(CONTRACT)
    (tmp_path / "megatron" / "core").mkdir(parents=True)
    (tmp_path / "megatron" / "core" / "__init__.py").write_text("")
    assert doctor.main(["--megatron-src", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "megatron.core.models.gpt.GPTModel is missing" in out
