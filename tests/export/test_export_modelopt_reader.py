"""ModelOpt's own reader of ``hf_quant_config.json`` accepts what we write for every scheme.

The reader is ``modelopt/torch/export/convert_hf_config.py`` of ``nvidia-modelopt`` 0.47.0 (what
vLLM and SGLang mirror when they map a ModelOpt checkpoint onto compressed-tensors-style config
groups). ``make setup`` installs the package with ``--no-deps`` (its dependencies are CUDA- and
solver-oriented); this one module imports only the standard library, so it is loaded from the
installed file without importing the rest of ModelOpt.
"""

import importlib.util
import warnings
from pathlib import Path

import pytest

from megaquant.export import layouts as L
from megaquant.export.schemes import SCHEMES


def _modelopt_reader():
    spec = importlib.util.find_spec("modelopt")
    if spec is None:
        pytest.skip("nvidia-modelopt is not installed (make setup installs it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "torch" / "export" / "convert_hf_config.py"
    mod_spec = importlib.util.spec_from_file_location("modelopt_convert_hf_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


# what each scheme's weights / activations are, as ModelOpt's config groups spell them
EXPECTED = {"nvfp4": ((4, "float", 16), (4, "float")), "nvfp4_w4a16": ((4, "float", 16), None),
            "fp8": ((8, "float", None), (8, "float")), "int8": ((8, "int", None), (8, "int")),
            "mxfp8": ((8, "float", 32), (8, "float")), "int4_w4a16": ((4, "int", 64), None)}


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if L.supports("modelopt", s)])
def test_modelopt_reader_accepts_our_hf_quant_config(scheme):
    reader = _modelopt_reader()
    ours = L.hf_quant_config(scheme, ["lm_head", "model.layers.0.mlp.gate"], block_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = reader.convert_hf_quant_config_format(ours)
        algo = ours["quantization"]["quant_algo"]
        group = reader._quant_algo_to_group_config(algo, ours["quantization"].get("group_size"))
    assert converted["quant_method"] == "modelopt" and converted["quant_algo"] == algo
    assert converted["ignore"] == ["lm_head", "model.layers.0.mlp.gate"]
    assert converted["producer"]["name"] == "megaquant"
    if scheme == "mxfp4":  # documented in modelopt_layout: ModelOpt has no config group for it
        assert "weights" not in group and any("mxfp4" in str(w.message) for w in caught)
        return
    assert not caught, [str(w.message) for w in caught]
    (bits, kind, size), act = EXPECTED[scheme]
    w = group["weights"]
    assert (w["num_bits"], w["type"], w.get("group_size")) == (bits, kind, size), w
    if scheme == "int8":
        assert w["strategy"] == "channel"  # per-channel weights, as our weight_scale [out]
    a = group.get("input_activations")
    assert (a is None) == (act is None) and (act is None or (a["num_bits"], a["type"]) == act)
    if algo in ("FP8", "NVFP4", "W4A16_NVFP4"):  # the converter builds these groups itself
        top = converted["config_groups"]["group_0"]
        assert top["weights"]["num_bits"] == bits and top["weights"].get("group_size") == size


def test_config_json_quantization_config_mirrors_hf_quant_config():
    for scheme in SCHEMES:
        if L.supports("modelopt", scheme):
            q = L.quantization_config("modelopt", scheme, ["lm_head"], block_size=128)
            hq = L.hf_quant_config(scheme, ["lm_head"], block_size=128)["quantization"]
            assert q == {"quant_method": "modelopt", **hq}
