"""The recipe's ``calib:`` section: validated at config time, with messages naming the remedy."""

import pytest

from megaquant.calib.algorithms import CalibConfig
from megaquant.ptq import _calib_config
from megaquant.recipe import load_recipe

W4A16 = {"name": "w", "rules": [{"modules": "*", "weight": {"format": "int4"}}]}
W4A4 = {"name": "a", "rules": [{"modules": "*", "weight": {"format": "nvfp4"},
                                "input": {"format": "nvfp4"}}]}


def test_recipe_calib_smoothquant_on_weight_only_is_a_config_error():
    with pytest.raises(ValueError, match="smoothquant.*Valid combinations.*awq: weight-only"):
        load_recipe({**W4A16, "calib": {"algorithm": "smoothquant"}})


def test_recipe_calib_awq_with_quantized_activations_is_a_config_error():
    with pytest.raises(ValueError, match="AWQ is for weight-only recipes"):
        load_recipe({**W4A4, "calib": {"algorithm": "awq"}})


def test_recipe_calib_unknown_algorithm_and_option_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['awq', 'block_hadamard', 'gptq', 'max', 'mse', "
                                         r"'rotate_heads', 'rotate_residual', 'smoothquant'\]"):
        load_recipe({**W4A4, "calib": {"algorithm": "gptqq"}})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dampp'\].*'damp'"):
        load_recipe({**W4A4, "calib": {"algorithm": "gptq", "dampp": 0.1}})
    with pytest.raises(ValueError, match="alpha must be in"):
        load_recipe({**W4A4, "calib": {"algorithm": "smoothquant", "alpha": 1.5}})


@pytest.mark.parametrize("name,algorithm", [("int8_sq", "smoothquant"), ("int4_awq", "awq"),
                                            ("nvfp4_mse", "mse"), ("nvfp4_gptq", "gptq"),
                                            ("nvfp4_sq", "smoothquant"),
                                            ("mxfp4_sq", "smoothquant"),
                                            ("nvfp4", "max"), ("int8", "max")])
def test_builtin_recipes_carry_their_algorithm(name, algorithm):
    assert load_recipe(name).calib.algorithm == algorithm


def test_quantize_calib_override_is_checked_against_the_recipe():
    recipe = load_recipe(W4A16)
    assert _calib_config(recipe, "awq") == CalibConfig("awq")
    assert _calib_config(recipe, {"algorithm": "gptq", "damp": 0.1}).options == {"damp": 0.1}
    with pytest.raises(ValueError, match="smoothquant"):
        _calib_config(recipe, "smoothquant")


def test_a_list_chains_algorithms_and_every_step_is_checked():
    calib = CalibConfig.from_dict([{"algorithm": "smoothquant", "search": True}, "gptq"])
    assert calib.name == "smoothquant+gptq" and [s.algorithm for s in calib.steps] == [
        "smoothquant", "gptq"]
    assert calib.to_dict() == [{"algorithm": "smoothquant", "search": True}, {"algorithm": "gptq"}]
    assert CalibConfig.from_dict(calib.to_dict()) == calib
    with pytest.raises(ValueError, match=r"calib\[1\].*unknown option"):
        CalibConfig.from_dict(["smoothquant", {"algorithm": "gptq", "dmp": 0.1}])
    with pytest.raises(ValueError, match="'max' cannot be chained"):
        CalibConfig.from_dict(["max", "gptq"])
    with pytest.raises(ValueError, match="smoothquant.*does not apply"):  # weight-only recipe
        load_recipe({"name": "w4", "rules": [{"modules": "*", "weight": {"format": "int4"}}],
                     "calib": ["gptq", "smoothquant"]})
