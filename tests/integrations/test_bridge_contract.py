"""The Megatron-Bridge / NeMo contract: the fixture, the ast reader, version checks, doctor.

The fixture was read from the released wheels by ``scripts/bridge_contract.py``. Here: every
recorded release gives megaquant what its hook relies on; the reader, on a small synthetic
Bridge-shaped tree, finds the same facts and notices a tree that breaks them; the protocol
doubles follow the recorded order; an installed release outside the contract is refused by
version. With ``MEGAQUANT_BRIDGE_WHEELS=DIR`` (the wheels the fixture was made from) the
wheels are re-read and must equal the fixture.
"""

import copy
import os
from pathlib import Path

import pytest

from megaquant.integrations import contract
from megaquant.integrations.source import read_bridge, read_nemo

PROVIDER = '''
class ModelProviderMixin:
    def provide_distributed_model(self, ddp_config=None, wrap_with_ddp=True, pre_wrap_hook=None):
        return get_model(self, ddp_config, pre_wrap_hook=pre_wrap_hook or self.pre_wrap_hook)

    @property
    def pre_wrap_hook(self):
        def composed_hook(model):
            for hook in self._pre_wrap_hooks:
                model = hook(model)
            return model
        return composed_hook

    def register_pre_wrap_hook(self, hook, prepend=False):
        self._pre_wrap_hooks.append(hook)

    def register_post_wrap_hook(self, hook, prepend=False):
        self._post_wrap_hooks.append(hook)

def get_model(model_provider, ddp_config, wrap_with_ddp=True, pre_wrap_hook=None, *, pg_collection):
    model = _create_model(model_provider)
    {hook}
    for m in model:
        m.cuda(0)
    model = [mixed_precision_wrapper(c, m) for m in model]
    {hook_late}
    if wrap_with_ddp:
        model = _ddp_wrap(model)
    return model
'''
HOOK = "model = pre_wrap_hook(model)"
SETUP = '''
def setup(cfg):
    _register_pre_wrap_hook(cfg.model, hook)
    model = _build_distributed_model(cfg)
    optimizer, scheduler = setup_optimizer(model)
    checkpoint_manager.load(model)

def _register_pre_wrap_hook(model_cfg, hook):
    if isinstance(model_cfg, ModelConfig):
        model_cfg.pre_wrap_hooks.append(hook)
    else:
        model_cfg.register_pre_wrap_hook(hook)
'''
AUTO = '''
class AutoBridge:
    def to_megatron_provider(self, load_weights=True, hf_path=None):
        provider.register_pre_wrap_hook(load)
    def export_hf_weights_quant(self, model, quantization_checker, quant_fn,
                                quant_block_size=None, cpu=False):
        pass
'''
SAVE = "def save_megatron_model(model, path, ckpt_format='torch_dist'):\n    pass\n"
PRETRAIN = "def pretrain(config, forward_step_func, callbacks=None):\n    pass\n"
METADATA = "Metadata-Version: 2.1\nName: megatron-bridge\nVersion: {version}\n"


def _tree(root: Path, version="0.5.0", late=False) -> Path:
    files = {
        "megatron/bridge/models/model_provider.py": PROVIDER.format(
            hook="" if late else HOOK, hook_late=HOOK if late else ""),
        "megatron/bridge/training/setup.py": SETUP,
        "megatron/bridge/models/conversion/auto_bridge.py": AUTO,
        "megatron/bridge/training/model_load_save.py": SAVE,
        "megatron/bridge/training/pretrain.py": PRETRAIN,
        f"megatron_bridge-{version}.dist-info/METADATA": METADATA.format(version=version),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _releases(dist):
    return contract.load_contract()[dist]["releases"]


def test_fixture_covers_the_releases_users_run():
    assert contract.recorded_range("megatron-bridge") == ("0.3.0", "0.6.2")
    assert contract.recorded_range("nemo-toolkit") == ("2.0.0", "2.7.3")
    assert {"0.3.1", "0.4.2", "0.5.1", "0.6.0"} <= set(_releases("megatron-bridge"))


def test_every_recorded_release_keeps_the_contract():
    for dist in contract.DISTS:
        for version, entry in _releases(dist).items():
            assert contract.VIOLATIONS[dist](entry) == [], (dist, version)
    bridge = _releases("megatron-bridge")
    assert all(e["provider_chain_checks_none"] is False for e in bridge.values())
    assert all(e["hf_weights_loaded_by_pre_wrap_hook"] for e in bridge.values())
    assert [v for v, e in bridge.items() if e["signatures"]["AutoBridge.export_hf_weights_quant"]
            ] == ["0.5.0", "0.5.1", "0.6.0", "0.6.2"]


def test_violations_name_the_release_and_the_broken_fact():
    entry = copy.deepcopy(_releases("megatron-bridge")["0.6.2"])
    entry["get_model_order"] = ["build", "float16_module", "pre_wrap_hook", "ddp"]
    entry["setup_order"] = ["build_model", "register_hooks", "optimizer", "checkpoint_load"]
    entry["signatures"]["ModelProviderMixin.register_pre_wrap_hook"] = ["self", "fn"]
    entry["signatures"]["AutoBridge.export_hf_weights_quant"] = None
    problems = contract.bridge_violations(entry)
    assert len(problems) == 4 and all(p.startswith("0.6.2: ") for p in problems)
    nemo = dict(_releases("nemo-toolkit")["2.7.3"], has_llm_collection=False)
    want = "2.7.3: nemo.collections.llm is absent (NeMo 2 LLM collection)"
    assert contract.nemo_violations(nemo) == [want]


def test_reader_on_a_bridge_shaped_tree(tmp_path):
    entry = read_bridge(_tree(tmp_path / "ok"))
    assert entry["version"] == "0.5.0"
    assert entry["get_model_order"] == ["build", "pre_wrap_hook", "to_gpu", "float16_module",
                                        "ddp"]
    assert entry["setup_order"] == ["register_hooks", "build_model", "optimizer",
                                    "checkpoint_load"]
    assert entry["provider_chain_checks_none"] is False
    assert entry["setup_registers_on_hook_list"] and entry["hf_weights_loaded_by_pre_wrap_hook"]
    assert entry["signatures"]["ModelProviderMixin.register_pre_wrap_hook"] == [
        "self", "hook", "prepend=False"]
    assert contract.bridge_violations(entry) == []
    late = read_bridge(_tree(tmp_path / "late", late=True))  # hook after Float16Module
    assert late["get_model_order"] == ["build", "to_gpu", "float16_module", "pre_wrap_hook",
                                       "ddp"]
    assert "get_model no longer runs" in contract.bridge_violations(late)[0]
    with pytest.raises(FileNotFoundError, match="not a megatron-bridge wheel"):
        read_bridge(tmp_path / "ok" / "megatron")


def test_doubles_follow_the_recorded_order(megatron_single):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from tests.integrations.bridge_doubles import ModelConfigDouble, ProviderDouble

    def build():
        return [build_gpt_model(tiny_gpt_config(num_layers=1), tp_size=1)]

    for double in (ProviderDouble(build), ModelConfigDouble(build)):
        hooks = (double.register_pre_wrap_hook if isinstance(double, ProviderDouble)
                 else double.pre_wrap_hooks.append)
        hooks(lambda model: model)
        if isinstance(double, ProviderDouble):
            double.provide_distributed_model(ddp_config=object())
        else:
            double.build_distributed_models()
        for entry in _releases("megatron-bridge").values():
            assert double.events == [e for e in entry["get_model_order"] if e != "to_gpu"]


@pytest.mark.skipif(not os.environ.get("MEGAQUANT_BRIDGE_WHEELS"),
                    reason="set MEGAQUANT_BRIDGE_WHEELS=DIR (the wheels) to re-read them")
def test_wheels_reread_equal_the_fixture():
    wheels = Path(os.environ["MEGAQUANT_BRIDGE_WHEELS"])
    for dist, read, stem in (("megatron-bridge", read_bridge, "megatron_bridge"),
                             ("nemo-toolkit", read_nemo, "nemo_toolkit")):
        for version, entry in _releases(dist).items():
            assert read(wheels / f"{stem}-{version}-py3-none-any.whl") == entry, (dist, version)


def test_release_outside_the_contract_is_refused_by_version(monkeypatch):
    assert contract.check_release("megatron-bridge", "0.6.1") == "0.6.1"
    assert contract.check_release("nemo-toolkit", "2.7.3") == "2.7.3"
    with pytest.raises(RuntimeError, match=r"megatron-bridge 0\.7\.0 is outside.*0\.3\.0 \.\. "
                                           r"0\.6\.2"):
        contract.check_release("megatron-bridge", "0.7.0")
    with pytest.raises(RuntimeError, match=r"megatron-bridge 0\.2\.0rc6 is outside"):
        contract.check_release("megatron-bridge", "0.2.0rc6")
    with pytest.raises(RuntimeError, match=r"nemo-toolkit 3\.0\.0 is outside.*gone in 3\.0"):
        contract.check_release("nemo-toolkit", "3.0.0")
    monkeypatch.setattr(contract, "installed_version", lambda dist: None)
    assert contract.check_release("megatron-bridge") is None  # not installed: nothing to check


def test_attach_and_transform_refuse_an_installed_release_outside(monkeypatch):
    from megaquant.integrations.bridge import attach
    from megaquant.integrations.nemo import QuantizeTransform
    from tests.integrations.bridge_doubles import ProviderDouble

    monkeypatch.setattr(contract, "installed_version",
                        {"megatron-bridge": "0.7.0", "nemo-toolkit": "3.0.0"}.get)
    with pytest.raises(RuntimeError, match=r"megatron-bridge 0\.7\.0"):
        attach(ProviderDouble(list), "nvfp4")
    attach(ProviderDouble(list), "nvfp4", check_version=False)  # the user's explicit choice
    with pytest.raises(RuntimeError, match=r"nemo-toolkit 3\.0\.0"):
        QuantizeTransform("nvfp4")([])


def test_doctor_reports_the_installed_bridge(monkeypatch, tmp_path, capsys):
    from megaquant import doctor

    trees = {"megatron-bridge": _tree(tmp_path / "ok", version="0.5.0")}
    monkeypatch.setattr(contract, "installed_version",
                        lambda dist: "0.5.0" if dist in trees else None)
    monkeypatch.setattr(contract, "source_root", trees.__getitem__)
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "megatron-bridge: 0.5.0, contract holds (recorded 0.3.0 .. 0.6.2)" in out
    assert "nemo-toolkit: absent" in out
    trees["megatron-bridge"] = _tree(tmp_path / "late", version="0.5.0", late=True)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "contract BROKEN" in out and "ERROR: 0.5.0: get_model no longer runs" in out
    monkeypatch.setattr(contract, "installed_version", lambda dist: "0.9.0" if dist in trees
                        else None)
    assert doctor.main([]) == 1
    assert "megatron-bridge 0.9.0 is outside" in capsys.readouterr().out


NEMO_TRANSFORM = '''
class ModelTransform:
    def setup(self, trainer, pl_module, stage):
        self.model_transform = pl_module.model_transform

    def apply_transform(self, trainer):
        self.model_transform(trainer.model)
'''


def _wheel(tree: Path, out: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(out, "w") as z:
        for p in tree.rglob("*"):
            if p.is_file():
                z.write(p, p.relative_to(tree).as_posix())
    return out


@pytest.mark.parametrize("late", [False, True])
def test_contract_script_writes_the_fixture_and_flags_a_broken_release(tmp_path, capsys, late):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "bridge_contract", Path(__file__).resolve().parents[2] / "scripts" / "bridge_contract.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(_tree(tmp_path / "bridge", late=late), wheels / "megatron_bridge-0.5.0-py3-none-any.whl")
    nemo = tmp_path / "nemo"
    for rel, text in {"nemo/lightning/pytorch/callbacks/model_transform.py": NEMO_TRANSFORM,
                      "nemo/collections/llm/__init__.py": "",
                      "nemo_toolkit-2.7.3.dist-info/METADATA": "Version: 2.7.3\n"}.items():
        (nemo / rel).parent.mkdir(parents=True, exist_ok=True)
        (nemo / rel).write_text(text)
    _wheel(nemo, wheels / "nemo_toolkit-2.7.3-py3-none-any.whl")
    out = tmp_path / "contract.json"
    rc = script.main(["--wheels", str(wheels), "--bridge", "0.5.0", "--nemo", "2.7.3",
                      "--out", str(out)])
    fixture = json.loads(out.read_text())
    assert fixture["nemo-toolkit"]["releases"]["2.7.3"]["apply_transform_calls_model_transform"]
    assert fixture["megatron-bridge"]["releases"]["0.5.0"]["setup_order"][0] == "register_hooks"
    assert rc == (1 if late else 0)
    assert ("CONTRACT BROKEN: 0.5.0: get_model" in capsys.readouterr().out) == late
