"""``megaquant doctor`` on a CPU machine: versions, and positions from a TE tree read with ast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaquant import cli, doctor

# A minimal TE-shaped tree: each module-level autograd function plus the layer that calls it.
TEMPLATE = '''
class {fn}(torch.autograd.Function):
    @staticmethod
    def forward({params}):
        return None

class {layer}:
    def forward(self, inp):
        if torch.is_grad_enabled():
            fn = {fn}.apply
            autograd_ctx = []
        else:
            fn = {fn}.forward
            autograd_ctx = [None]
        out = fn(*autograd_ctx, {args})
        return out
'''
FILES = {
    "linear": ("_Linear", "Linear", "ctx, weight, inp, bias, fwd_args", "weight_tensor, inp, b, a"),
    "layernorm_linear": ("_LayerNormLinear", "LayerNormLinear",
                         "ctx, inp, ln_weight, ln_bias, weight, bias, nta",
                         "inp, self.layer_norm_weight, lb, weight_tensor, b, n"),
    "grouped_linear": ("_GroupedLinear", "GroupedLinear",
                       "ctx, inp, m_splits, non_tensor_args, *weights_and_biases",
                       "inp, m_splits, nta, *weight_tensors, *bias_tensors"),
}


def make_tree(root: Path, version: str = "9.9.9", rename: dict | None = None) -> Path:
    module_dir = root / "transformer_engine/pytorch/module"
    module_dir.mkdir(parents=True)
    (root / "build_tools").mkdir()
    (root / "build_tools/VERSION.txt").write_text(version + "\n")
    for name, (fn, layer, params, args) in FILES.items():
        for old, new in (rename or {}).get(fn, {}).items():
            params = params.replace(old, new)
        src = TEMPLATE.format(fn=fn, layer=layer, params=params, args=args)
        (module_dir / f"{name}.py").write_text(src)
    return root


def test_doctor_resolves_positions_from_a_source_tree(tmp_path, capsys):
    tree = make_tree(tmp_path / "te")
    assert cli.main(["doctor", "--te-src", str(tree), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["versions"]["torch"] and report["versions"]["megatron-core"]
    (te,) = report["te"]
    assert te["version"] == "9.9.9" and te["source"] == f"ast:{tree}"
    fns = te["functions"]
    assert fns["_Linear"]["operands"] == {"weight": 1, "inp": 2}
    assert fns["_LayerNormLinear"]["operands"] == {"weight": 4, "inp": 1}
    assert fns["_GroupedLinear"]["operands"] == {"inp": 1}
    assert fns["_GroupedLinear"]["varargs_start"] == 4
    assert fns["_GroupedLinear"]["optional"]["m_splits"] == 2


def test_doctor_fails_naming_version_function_missing_and_found(tmp_path, capsys):
    tree = make_tree(tmp_path / "te", "3.0.0", rename={"_Linear": {"inp": "input_"}})
    assert doctor.main(["--te-src", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "ERROR: TE 3.0.0: _Linear.forward has no parameter 'inp'" in out
    assert "['ctx', 'weight', 'input_', 'bias', 'fwd_args']" in out


def test_doctor_without_te_reports_absent_and_fails_only_when_required(capsys):
    if doctor.installed_versions()["transformer-engine"]:
        pytest.skip("TE is installed here")
    assert doctor.main([]) == 0
    assert "transformer-engine: absent" in capsys.readouterr().out
    assert doctor.main(["--require-te", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and "not installed" in report["errors"][0]


def test_doctor_rejects_a_folder_that_is_not_a_te_tree(tmp_path, capsys):
    assert doctor.main(["--te-src", str(tmp_path)]) == 1
    assert "no transformer_engine/ folder" in capsys.readouterr().out
