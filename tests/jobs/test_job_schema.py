"""The job configs' schemas: unknown keys are refused by name, also when added with ``+``."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from megaquant.jobs.hydra import register_recipes
from megaquant.jobs.qat import nemo_style_overrides, register_quantization_group
from megaquant.jobs.schema import validate
from megaquant.recipe import RECIPE_DIR, load_recipe
from tests.distributed_utils import run_script

CONFIGS = str(RECIPE_DIR.parent / "configs")
OUT = ["run.output_dir=/tmp/unused"]


def _compose(job, overrides):
    register_recipes()
    register_quantization_group()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(job, overrides=overrides)


@pytest.mark.parametrize("override, key, valid", [
    ("+parallel.tpp=2", "parallel.tpp", "'tp', 'pp', 'ep'"),
    ("+run.overwrit=3", "run.overwrit", "'overwrite'"),
    ("+data.calib_sample=3", "data.calib_sample", "'calib_samples'"),
    ("+model.seq_len=3", "model.seq_len", "'seq_length'"),
])
def test_job_schema_refuses_added_unknown_keys(override, key, valid):
    cfg = _compose("ptq", ["+recipe=fp8", "model=tiny", override, *OUT])
    with pytest.raises(ValueError, match=rf"unknown config key '{key}'; valid keys .*{valid}"):
        validate(cfg, "ptq")


def test_job_schema_accepts_the_shipped_configs_and_free_form_recipes():
    cfg = _compose("ptq", ["+recipe=nvfp4", "model=tiny_moe", "parallel.ep=2", *OUT])
    values = validate(cfg, "ptq")
    assert values["parallel"] == {"tp": 1, "pp": 1, "ep": 2, "pp_first_layers": None,
                                  "pp_last_layers": None} and values["run"]["overwrite"] is True
    assert load_recipe(values["recipe"]).name == "nvfp4"
    # The recipe group is free-form for Hydra; megaquant's recipe parser refuses its typos.
    cfg = _compose("ptq", ["+recipe=fp8", "+recipe.rules.0.weight.blocksize=3", *OUT])
    values = validate(cfg, "ptq")
    with pytest.raises(ValueError, match="blocksize"):
        load_recipe(values["recipe"])
    validate(_compose("export", ["checkpoint=a", "output_dir=b"]), "export")


def test_job_schema_checks_types_and_plain_typos_while_composing():
    with pytest.raises(ConfigCompositionException, match="tpp"):
        _compose("ptq", ["+recipe=fp8", "parallel.tpp=2", *OUT])
    with pytest.raises(ConfigCompositionException, match="tp"):
        _compose("ptq", ["+recipe=fp8", "parallel.tp=two", *OUT])


def test_job_schema_qat_and_export_refuse_added_keys():
    ok = _compose("qat", nemo_style_overrides(["model.quantization=null"]))
    assert "quantization" not in validate(ok, "qat")["model"]
    cfg = _compose("qat", nemo_style_overrides(["model.quantization=fp8", "+model.seq_len=3"]))
    with pytest.raises(ValueError, match=r"unknown config key 'model.seq_len'.*'seq_length'"):
        validate(cfg, "qat")
    cfg = _compose("export", ["checkpoint=a", "output_dir=b", "+overwritee=true"])
    with pytest.raises(ValueError, match=r"unknown config key 'overwritee'.*'overwrite'"):
        validate(cfg, "export")


@pytest.mark.timeout(200)
def test_job_schema_ptq_script_fails_fast_on_an_added_typo(tmp_path):
    res = run_script("ptq.py", ["+recipe=fp8", "model=tiny", "+parallel.tpp=2",
                                f"run.output_dir={tmp_path / 'out'}"])
    assert res.returncode != 0
    assert "unknown config key 'parallel.tpp'" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out" / "summary.json").exists()
