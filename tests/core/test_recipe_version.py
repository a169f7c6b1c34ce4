"""Recipe schema versions: old recipes (stored in checkpoints) keep loading and comparing."""

import json

import pytest
import yaml

from megaquant.recipe import (
    RECIPE_DIR,
    RECIPE_VERSION,
    Recipe,
    available_recipes,
    canonical_recipe,
    load_recipe,
)
from megaquant.train.state import check_compatible


@pytest.mark.parametrize("name", available_recipes())
def test_recipe_version_round_trip_of_every_builtin(name):
    recipe = load_recipe(name)
    assert recipe.version == RECIPE_VERSION
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))  # as a checkpoint holds it
    assert again == recipe


def test_recipe_version_unversioned_is_version_1_and_upgrades():
    v2 = yaml.safe_load((RECIPE_DIR / "nvfp4_sq.yaml").read_text())
    v1 = {k: v for k, v in v2.items() if k != "version"}  # as checkpoints before versions hold it
    assert load_recipe(v1) == load_recipe(v2)
    assert canonical_recipe(v1) == canonical_recipe(v2) != v1
    assert canonical_recipe(None) is None


@pytest.mark.parametrize("version", [0, RECIPE_VERSION + 1, "2"])
def test_recipe_version_unknown_is_refused_naming_the_readable_ones(version):
    d = {"name": "t", "version": version, "rules": [{"modules": "*", "weight": {"format": "fp8"}}]}
    with pytest.raises(ValueError,
                       match=rf"unknown recipe version .*versions 1\.\.{RECIPE_VERSION}"):
        load_recipe(d)


def test_recipe_version_old_checkpoint_compares_equal(tmp_path):
    v1 = yaml.safe_load((RECIPE_DIR / "fp8.yaml").read_text())
    del v1["version"]
    meta = {"metadata": {"kind": "ptq", "recipe_config": v1}}
    (tmp_path / "megaquant.json").write_text(json.dumps(meta))
    check_compatible(tmp_path, load_recipe("fp8").to_dict(), kind="ptq")  # no error
    with pytest.raises(ValueError, match="was made with recipe 'fp8'"):
        check_compatible(tmp_path, load_recipe("int8").to_dict(), kind="ptq")


def test_recipe_version_2_upgrades_to_current_with_an_empty_auto_header():
    v2 = yaml.safe_load((RECIPE_DIR / "fp8.yaml").read_text())
    v2["version"] = 2
    assert "auto" not in v2
    recipe = load_recipe(v2)
    assert recipe.version == RECIPE_VERSION and recipe.auto == {}
    assert canonical_recipe(v2)["auto"] == {}
    with pytest.raises(ValueError, match=r"auto: unknown key\(s\) \['bogus'\]; valid keys"):
        load_recipe({**v2, "auto": {"bogus": 1}})
