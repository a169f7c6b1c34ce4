"""Recipes: every built-in loads, and bad input is an error that names the valid choices."""

import pytest

from megaquant.recipe import Recipe, available_recipes, load_recipe

BUILTIN = ["nvfp4", "nvfp4_w4a16", "fp8", "fp8_per_channel", "mxfp8", "mxfp4", "int8", "int4_w4a16"]


def test_recipe_builtins_are_all_present_and_load():
    assert set(BUILTIN) <= set(available_recipes())
    for name in BUILTIN:
        r = load_recipe(name)
        assert r.name == name and r.rules
        assert r.resolve("decoder.layers.0.mlp.linear_fc1")["weight"] is not None


def test_recipe_weight_only_recipes_leave_inputs_off():
    for name in ("nvfp4_w4a16", "int4_w4a16"):
        assert load_recipe(name).resolve(
            "decoder.layers.3.self_attention.linear_qkv")["input"] is None


def test_recipe_excludes_output_layer_and_router_by_default():
    r = load_recipe("nvfp4")
    assert r.is_excluded("output_layer") and r.is_excluded("decoder.layers.0.mlp.router")
    assert r.is_excluded("decoder.layers.0.mlp.linear_fc1") is None


def test_recipe_later_rule_overrides_only_the_roles_it_names():
    r = Recipe.from_dict({"name": "t", "rules": [
        {"modules": "*", "weight": {"format": "fp8"}, "input": {"format": "fp8"}},
        {"modules": "*fc2*", "input": None},
    ]})
    fc2, fc1 = r.resolve("layers.0.mlp.linear_fc2"), r.resolve("layers.0.mlp.linear_fc1")
    assert fc2["input"] is None and fc2["weight"].format == "fp8"
    assert fc1["input"].format == "fp8"


@pytest.mark.parametrize("bad, match", [
    ({"name": "t", "rules": [{"modules": "*", "weight": {"format": "fp9"}}]}, "fp8"),
    ({"name": "t", "rules": [{"modules": "*", "wieght": {"format": "fp8"}}]}, "valid keys"),
    ({"name": "t", "rules": [{"modules": "*", "weight": {"format": "fp8", "axes": 0}}]}, "axis"),
    ({"name": "t", "rules": [{"modules": "*", "weight": {"format": "fp8", "amax": "x"}}]},
     "static"),
    ({"name": "t", "rulez": []}, "valid keys"),
    ({"name": "t", "rules": []}, "non-empty"),
])
def test_recipe_bad_input_names_valid_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(bad)


def test_recipe_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match="nvfp4"):
        load_recipe("nvfp5")
