"""Quantized local Megatron linears and in-place conversion, at TP=1, against direct math."""

import pytest
import torch
import torch.nn.functional as F

import megaquant
from megaquant.convert import convert_model
from megaquant.formats import get_format
from megaquant.recipe import load_recipe


def _tiny(megatron_single, backend=None, seed=0):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(seed)
    return build_gpt_model(tiny_gpt_config(), backend, tp_size=1)


def _tokens(n=2, s=16, seed=0):
    return torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, None, None)


def test_quant_column_linear_equals_linear_of_fake_quantized_operands(megatron_single):
    from megaquant.models.gpt import tiny_gpt_config
    from megaquant.nn.local import QuantColumnParallelLinear

    cfg = tiny_gpt_config().to_transformer_config(1)
    layer = QuantColumnParallelLinear(64, 96, config=cfg, init_method=torch.nn.init.normal_,
                                      bias=True, gather_output=False, skip_bias_add=False)
    fmt = get_format("nvfp4")
    layer.input_quantizer.configure(fmt, "dynamic")
    layer.weight_quantizer.configure(fmt, "dynamic")
    x = torch.randn(5, 2, 64)
    out, bias = layer(x)
    ref = F.linear(fmt.fake_quantize(x), fmt.fake_quantize(layer.weight), layer.bias)
    assert bias is None
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()  # straight-through gradient reaches the parameter
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_quant_layer_loads_parent_state_dict_unchanged(megatron_single):
    from megaquant.spec import get_spec_provider

    plain = _tiny(megatron_single)
    quant = _tiny(megatron_single, get_spec_provider("local"), seed=1)
    quant.load_state_dict(plain.state_dict(), strict=True)
    tokens = _tokens()
    torch.testing.assert_close(_logits(quant, tokens), _logits(plain, tokens), rtol=0, atol=0)


def test_convert_swaps_registered_layers_in_place_and_reports(megatron_single):
    from megaquant.nn.local import QuantColumnParallelLinear, QuantRowParallelLinear

    model = _tiny(megatron_single)
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    weight = qkv.weight
    report = convert_model(model, load_recipe("fp8"))
    assert model.decoder.layers[0].self_attention.linear_qkv is qkv  # same object
    assert isinstance(qkv, QuantColumnParallelLinear) and qkv.weight is weight
    assert isinstance(model.decoder.layers[1].mlp.linear_fc2, QuantRowParallelLinear)
    assert len(report.converted) == 2 * 4  # qkv, proj, fc1, fc2 in each of 2 layers
    assert "output_layer" in report.skipped


def test_convert_model_with_nothing_to_quantize_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="nothing to quantize"):
        convert_model(model, load_recipe("fp8"))


def test_recipe_rule_matching_no_layer_is_an_error(megatron_single):
    model = _tiny(megatron_single)
    recipe = {"name": "typo", "rules": [{"modules": "*linear_qvk*", "weight": {"format": "fp8"}}]}
    with pytest.raises(ValueError, match="matches no quantizable layer"):
        megaquant.quantize(model, recipe)


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8_per_channel", "int8", "mxfp4", "int4_w4a16"])
def test_spec_route_and_convert_route_give_identical_results(megatron_single, recipe):
    from megaquant.spec import get_spec_provider

    tokens, calib = _tokens(seed=3), [_tokens(seed=s) for s in range(2)]
    loop = lambda m: [m(t, None, None) for t in calib]  # noqa: E731
    built = _tiny(megatron_single, get_spec_provider("local"))
    converted = _tiny(megatron_single)
    converted.load_state_dict(built.state_dict(), strict=False)
    megaquant.quantize(built, recipe, loop)
    megaquant.quantize(converted, recipe, loop)
    assert torch.equal(_logits(built, tokens), _logits(converted, tokens))
    sd_b = {k: v for k, v in built.state_dict().items() if k.endswith("amax")}
    sd_c = {k: v for k, v in converted.state_dict().items() if k.endswith("amax")}
    assert sd_b.keys() == sd_c.keys() and all(torch.equal(sd_b[k], sd_c[k]) for k in sd_b)


def test_quantized_model_output_differs_from_fp_by_a_bounded_amount(megatron_single):
    model = _tiny(megatron_single)
    tokens = _tokens(seed=4)
    ref = _logits(model, tokens)
    megaquant.quantize(model, "fp8", lambda m: m(_tokens(seed=5), None, None))
    out = _logits(model, tokens)
    rel = (out - ref).norm() / ref.norm()
    # FP8 E4M3 has 3 mantissa bits (relative step 2^-4): a 2-layer model drifts a few percent.
    assert 0 < rel < 0.1


def test_weight_amax_is_calibrated_without_data(megatron_single):
    model = _tiny(megatron_single)
    recipe = {"name": "w8", "rules": [{"modules": "*", "weight": {"format": "fp8", "axis": 0}}]}
    report = megaquant.quantize(model, recipe)  # weight-only: no forward loop needed
    assert report.calibration["used_forward_loop"] is False
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    ref = fc1.weight.detach().abs().amax(dim=1)
    assert torch.equal(fc1.weight_quantizer.amax.reshape(-1), ref)


def test_nonfinite_activation_during_calibration_names_layer_and_batch(megatron_single):
    model = _tiny(megatron_single)
    fc2 = model.decoder.layers[0].mlp.linear_fc2  # inf here reaches layer 1's inputs
    batches = [_tokens(seed=s) for s in range(3)]

    def loop(m):
        for i, t in enumerate(batches):
            with torch.no_grad():
                fc2.weight[0, 0] = float("inf") if i == 1 else 0.0
            m(t, None, None)

    with pytest.raises(FloatingPointError,
                       match=r"decoder\.layers\.1\.self_attention\.linear_qkv.*batch 2"):
        megaquant.quantize(model, "fp8", loop)


def test_calibration_recipe_without_forward_loop_is_an_error(megatron_single):
    with pytest.raises(ValueError, match="forward_loop"):
        megaquant.quantize(_tiny(megatron_single), "nvfp4")


def test_quantized_gpt_layer_spec_builds_quantized_linears(megatron_single):
    from megatron.core.models.gpt import GPTModel

    from megaquant.models.gpt import tiny_gpt_config
    from megaquant.nn.local import QuantColumnParallelLinear, QuantRowParallelLinear
    from megaquant.spec import get_spec_provider, quantized_gpt_layer_spec

    cfg = tiny_gpt_config()
    model = GPTModel(config=cfg.to_transformer_config(1),
                     transformer_layer_spec=quantized_gpt_layer_spec(),
                     vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
                     position_embedding_type="rope")
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, QuantColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, QuantRowParallelLinear)
    assert all(q.mode == "off" for _, _, q in layer.mlp.linear_fc1.quantizers())
    with pytest.raises(ValueError, match="valid"):
        get_spec_provider("cuda")
