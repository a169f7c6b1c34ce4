"""The algorithms on the tiny GPT (one process): exact folding, finite results, named fallbacks.

References: the unquantized model (a scale folded into a norm or the up rows must leave the float
model's loss unchanged, atol 1e-5 on a loss of ~5.5) and the weights before the algorithm.
"""

import pytest
import torch

import megaquant
from megaquant.calib import gptq
from megaquant.calib.algorithms import CalibConfig, InputStats, run_algorithm
from megaquant.evaluate import evaluate_loss, run_forward
from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
from megaquant.ptq import restore
from megaquant.quantizer import disable_quantizers

INT4 = {"name": "int4_32",
        "rules": [{"modules": "*", "weight": {"format": "int4", "block_size": 32}}]}


def _batches(n, seed, seq=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, seq), generator=g) for _ in range(n)]


def _model(seed=0):
    torch.manual_seed(seed)
    return build_gpt_model(tiny_gpt_config(), tp_size=1)


@pytest.mark.parametrize("recipe,algorithm,options", [
    ("int8", "smoothquant", {}), ("int8", "smoothquant", {"search": True}),
    (INT4, "awq", {"clip": False})])  # AWQ's clipping changes the float weights on purpose
def test_scale_folding_leaves_the_float_model_unchanged(megatron_single, recipe, algorithm,
                                                        options):
    model, evals = _model(), [torch.cat([b, b[:, :1]], 1) for b in _batches(2, 2)]
    ref = evaluate_loss(model, evals, megatron_single.dp_group)
    before = {k: v.clone() for k, v in model.state_dict().items() if "layernorm" in k}
    restore(model, recipe)
    calib = _batches(2, 1)
    run_algorithm(model, CalibConfig(algorithm, options),
                  lambda m: run_forward(m, calib, "calib", megatron_single.dp_group),
                  megatron_single.dp_group)
    changed = [k for k, v in before.items() if not torch.equal(model.state_dict()[k], v)]
    assert changed, "no norm was rescaled: the algorithm did nothing"
    disable_quantizers(model)
    assert abs(evaluate_loss(model, evals, megatron_single.dp_group) - ref) < 1e-5


@pytest.mark.parametrize("recipe", ["int8_sq", "nvfp4_mse", "nvfp4_gptq", INT4 | {"calib": "awq"},
                                    INT4 | {"calib": "gptq"}])
def test_quantize_with_algorithm_gives_finite_weights_and_loss(megatron_single, recipe):
    model = _model()
    calib = _batches(2, 1)
    report = megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "c",
                                megatron_single.dp_group), dp_group=megatron_single.dp_group)
    assert report.calibration["algorithm"] != "max"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    evals = _batches(2, 2, seq=17)
    assert torch.isfinite(torch.tensor(evaluate_loss(model, evals, megatron_single.dp_group)))


def test_gptq_singular_hessian_warns_with_the_layer_name_and_keeps_rtn(megatron_single):
    model = _model()
    restore(model, INT4)
    name = "decoder.layers.0.mlp.linear_fc1"
    layer = model.get_submodule(name)
    n = layer.weight.shape[1]
    stats = InputStats(hessian=torch.ones(n, n, dtype=torch.float64), count=1)  # rank 1
    with pytest.warns(RuntimeWarning, match=f"gptq: {name}: the Hessian .* singular"):
        w, amax = gptq._quantize_layer(name, layer, stats, gptq.Options(damp=0.0))
    assert w is None and amax is None


@pytest.mark.parametrize("algorithm", ["mse", "gptq"])
def test_calib_step_modules_limit_the_layers_it_rewrites(megatron_single, algorithm):
    """``modules`` (recipe version 4): the step rewrites the matching layers' weights only;
    reference: the weights before the algorithm. A glob list matching nothing is refused."""
    model, calib = _model(), _batches(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    restore(model, "nvfp4")
    loop = lambda m: run_forward(m, calib, "calib", megatron_single.dp_group)  # noqa: E731
    run_algorithm(model, CalibConfig(algorithm, {"modules": ["*layers.1.mlp.linear_fc2"]}),
                  loop, megatron_single.dp_group)
    changed = sorted(k for k, v in before.items() if not torch.equal(model.state_dict()[k], v))
    assert changed == ["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match=r"modules \['\*fc3'\] match no quantized linear"):
        run_algorithm(model, CalibConfig(algorithm, {"modules": "*fc3"}), loop,
                      megatron_single.dp_group)
