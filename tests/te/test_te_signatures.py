"""Introspection against every TE release on PyPI (read from source into the committed fixture).

The reference is the signature history stated by hand from TE's sources (docs/te.md), checked
against what :func:`megaquant.te.resolve` finds by name; and the call sites TE writes, checked
to pass ``weight_tensor`` / ``inp`` exactly where the signature names ``weight`` / ``inp``.
"""

from __future__ import annotations

import inspect
import os
import textwrap
from pathlib import Path

import pytest
from packaging.version import Version
from te_doubles import RELEASES

from megaquant.te import TARGETS, FunctionSignature, TESignatureError, resolve
from megaquant.te.source import read_tree

VERSIONS = list(RELEASES)


def expected_positions(version: str, function: str) -> dict[str, int]:
    """Hand-written history (ctx = 0), independent of the resolver."""
    v = Version(version)
    if function == "_Linear":
        if v < Version("2.0"):
            return {"weight": 1, "inp": 3}  # (ctx, weight, weight_fp8, inp, ...)
        if Version("2.15") <= v < Version("2.16"):
            return {"weight": 1, "inp": 3}  # (ctx, weight, weight_workspace, inp, ...)
        return {"weight": 1, "inp": 2}  # (ctx, weight, inp, bias, ...)
    if function == "_LayerNormLinear":
        return {"weight": 4, "inp": 1}  # (ctx, inp, ln_weight, ln_bias, weight, ...) throughout
    assert function == "_GroupedLinear"
    return {"inp": 1}


def expected_grouped_m_splits(version: str) -> int | None:
    v = Version(version)
    return None if Version("2.10") <= v < Version("2.17") else 2


def test_fixture_covers_every_release_from_1_9_post1_to_2_20():
    versions = [Version(v) for v in VERSIONS]
    assert versions == sorted(versions)
    for must in ("1.9.0.post1", "1.10.0", "1.13.0", "2.1.0", "2.14.1", "2.15.0", "2.16.0",
                 "2.17.0", "2.19.0", "2.20.2"):
        assert must in RELEASES, must
    assert len(VERSIONS) >= 29


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.function)
def test_resolve_by_name_matches_the_signature_history(version, target):
    entry = RELEASES[version][target.function]
    sig = FunctionSignature(tuple(entry["params"]), entry["var_positional"])
    pos = resolve(target, sig, version)
    assert pos.positions == expected_positions(version, target.function)
    if target.function == "_GroupedLinear":
        assert pos.optional.get("m_splits") == expected_grouped_m_splits(version)
        assert pos.var_positional_start == len(entry["params"])
        if pos.optional.get("m_splits") is None:  # 2.10-2.16: m_splits leads the tuple
            assert entry["unpacked"]["non_tensor_args"][0] == "m_splits"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.function)
def test_call_sites_pass_operands_where_the_signature_names_them(version, target):
    entry = RELEASES[version][target.function]
    modes = sorted(s["mode"] for s in entry["call_sites"])
    assert modes == ["apply", "forward"], "TE calls apply with grad, forward(None, ...) without"
    for site in entry["call_sites"]:
        bound = site["bound"]
        assert bound.get("ctx") == ("None" if site["mode"] == "forward" else None)
        assert bound["inp"] == "inp"
        if "weight" in target.operands:
            assert bound["weight"] == "weight_tensor"
        if target.weights_in_varargs:  # expert weights lead *args in every release
            assert bound["*weights_and_biases"].startswith("*weight_tensors,")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.function)
def test_every_call_goes_through_the_patchable_module_global(version, target):
    """The call sits in the layer's forward, or (2.20 ``_linear_eager``) in a module-level
    function the layer's forward calls: both read the module global, which the patch replaces.
    """
    layer_forward = f"{target.layer}.forward"
    for site in RELEASES[version][target.function]["call_sites"]:
        assert site["caller"] == layer_forward or layer_forward in site["called_from"], site


@pytest.mark.parametrize("version", VERSIONS)
def test_te_bypasses_the_patched_function_only_under_torch_compile(version):
    """2.20 can reach a registered custom op instead of ``_Linear``: only while compiling, which
    the quantized layers refuse (so the patch never silently misses a call)."""
    for fn, entry in RELEASES[version].items():
        for guard in entry["bypass_when"]:
            assert guard.startswith("torch.compiler.is_compiling() and"), (fn, guard)


def test_grouped_1x_passes_fp8_weights_so_num_gemms_is_not_len_varargs():
    bound = RELEASES["1.9.0.post1"]["_GroupedLinear"]["call_sites"][0]["bound"]
    assert bound["*weights_and_biases"] == "*weight_tensors, *weight_tensors_fp8, *bias_tensors"


def test_resolve_rejects_a_patched_signature_with_a_clear_error():
    def patch(*args, **kwargs):
        return None

    sig = FunctionSignature.from_callable(patch)
    with pytest.raises(TESignatureError, match=r"TE 2\.20\.2: _Linear\.forward does not start"):
        resolve(TARGETS[0], sig, "2.20.2")


SYNTHETIC = '''
import torch

class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, weight_fp8, inp, bias, *extra):
        return inp

class Linear:
    def forward(self, inp):
        if torch.is_grad_enabled():
            linear_fn = _Linear.apply
            args = []
        else:
            linear_fn = _Linear.forward
            args = [None]
        args += (weight_tensor, None, inp, bias)
        out = linear_fn(*args)
        return out
'''


def test_source_reader_agrees_with_inspect_on_a_synthetic_tree(tmp_path: Path):
    """The ast reader against the reference: import the same file and ask ``inspect``."""
    path = tmp_path / "transformer_engine/pytorch/module/linear.py"
    path.parent.mkdir(parents=True)
    path.write_text(textwrap.dedent(SYNTHETIC))
    got = read_tree(tmp_path)["functions"]["_Linear"]
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - our own text
    live = FunctionSignature.from_callable(namespace["_Linear"].forward)
    assert (tuple(got["params"]), got["var_positional"]) == (live.params, live.var_positional)
    assert list(inspect.signature(namespace["_Linear"].forward).parameters)[:4] == got["params"][:4]
    forward_site = next(s for s in got["call_sites"] if s["mode"] == "forward")
    assert forward_site["args"] == ["None", "weight_tensor", "None", "inp", "bias"]
    assert forward_site["bound"] == {"ctx": "None", "weight": "weight_tensor", "inp": "inp"}


@pytest.mark.skipif(not os.environ.get("MEGAQUANT_TE_WHEELS"),
                    reason="set MEGAQUANT_TE_WHEELS to a folder of TE wheels to re-derive")
def test_fixture_is_what_the_script_writes(tmp_path: Path):
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sig.json"
    subprocess.run([sys.executable, str(root / "scripts/te_signatures.py"), "--wheels",
                    os.environ["MEGAQUANT_TE_WHEELS"], "--out", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(root)})
    assert json.loads(out.read_text())["versions"] == RELEASES
