"""KV-cache quantization: K (after RoPE) and V quantized in the core attention, calibrated by max.

References: the keys and values the unquantized core attention receives (captured by a forward
pre-hook), their max |x| (the amax, exact), and the attention output recomputed with those
tensors fake-quantized by the format itself (float32 forwards, atol 1e-6).
"""

import pytest
import torch

from megaquant.formats import get_format

SEQ = 16
KV_ONLY = {"name": "kv", "rules": [], "kv_cache": {"format": "fp8"}}


def _tiny(build="spec"):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider

    torch.manual_seed(0)
    cfg = tiny_gpt_config()
    return build_gpt_model(cfg, get_spec_provider("local") if build == "spec" else None)


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, SEQ), generator=g) for _ in range(n)]


def _capture_kv(model, batches):
    """name of each core attention -> list of (key, value) it received, unquantized."""
    from megaquant.evaluate import run_forward

    seen, hooks = {}, []
    for name, m in model.named_modules():
        if name.endswith("core_attention"):
            def pre(mod, args, kwargs, name=name):
                seen.setdefault(name, []).append((args[1].detach().clone(),
                                                  args[2].detach().clone()))
            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    run_forward(model, batches, "capture")
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("build", ["spec", "convert"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_kv_quant_amax_is_max_of_keys_after_rope_and_values(megatron_single, build, fmt):
    import megaquant
    from megaquant.evaluate import run_forward

    model, batches = _tiny(build), _batches()
    seen = _capture_kv(model, batches)
    assert len(seen) == 2
    recipe = {**KV_ONLY, "kv_cache": {"format": fmt}}
    megaquant.quantize(model, recipe, lambda m: run_forward(m, batches, "calib"))
    for name, pairs in seen.items():
        attn = model.get_submodule(name)
        for i, q in enumerate((attn.k_quantizer, attn.v_quantizer)):
            want = max(p[i].abs().max() for p in pairs)
            assert q.mode == "static" and q.fmt.name == fmt
            torch.testing.assert_close(q.amax, want.float(), rtol=0, atol=0)


def test_kv_quant_forward_uses_quantized_keys_and_values(megatron_single):
    import megaquant
    from megaquant.evaluate import evaluate_loss, run_forward

    model, batches = _tiny(), _batches()
    plain_loss = evaluate_loss(model, batches, None)
    megaquant.quantize(model, {**KV_ONLY, "kv_cache": {"format": "nvfp4"}},
                       lambda m: run_forward(m, batches, "calib"))
    attn = model.decoder.layers[0].self_attention.core_attention
    seen = _capture_kv(model, batches[:1])  # the hook sees the inputs before quantization
    k, v = seen["decoder.layers.0.self_attention.core_attention"][0]
    fmt = get_format("nvfp4")
    q = torch.randn(k.shape[0], k.shape[1], 4, k.shape[3])
    with torch.no_grad():
        got = attn(q, k, v, None)
        attn.k_quantizer.mode = attn.v_quantizer.mode = "off"
        want = attn(q, fmt.fake_quantize(k, attn.k_quantizer.amax),
                    fmt.fake_quantize(v, attn.v_quantizer.amax), None)
        unquantized = attn(q, k, v, None)
        attn.k_quantizer.mode = attn.v_quantizer.mode = "static"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - unquantized).abs().max() > 1e-4  # the quantizers do something
    assert evaluate_loss(model, batches, None) != pytest.approx(plain_loss, abs=1e-7)


def test_kv_quant_unit_scale_is_fixed_not_calibrated(megatron_single):
    import megaquant
    from megaquant.evaluate import run_forward

    model = _tiny()
    megaquant.quantize(model, {**KV_ONLY, "kv_cache": {"format": "fp8", "scale": "unit"}},
                       lambda m: run_forward(m, _batches(), "calib"))
    for name, m in model.named_modules():
        if name.endswith("core_attention"):
            for q in (m.k_quantizer, m.v_quantizer):
                assert q.mode == "static" and float(q.amax) == 448.0  # scale 448/448 = 1


def test_kv_quant_recipe_without_kv_leaves_attention_alone(megatron_single):
    import megaquant
    from megaquant.evaluate import run_forward

    model = _tiny("convert")
    report = megaquant.quantize(model, "fp8", lambda m: run_forward(m, _batches(), "calib"))
    assert not any("core_attention" in n for n in report.converted)
    assert type(model.decoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"


@pytest.mark.parametrize("kv, match", [
    ({"format": "int4"}, r"valid choices: \['fp8', 'nvfp4'\]"),
    ({"format": "mxfp8"}, r"valid choices: \['fp8', 'nvfp4'\]"),
    ({"format": "nvfp4", "scale": "unit"}, "fp8 only"),
    ({"format": "fp8", "sclae": "unit"}, r"unknown key\(s\) \['sclae'\]"),
])
def test_kv_quant_recipe_refuses_formats_engines_cannot_read(kv, match):
    from megaquant.recipe import load_recipe

    with pytest.raises(ValueError, match=match):
        load_recipe({**KV_ONLY, "kv_cache": kv})


def test_kv_quant_refuses_custom_core_attention_by_name(megatron_single):
    import megaquant
    from megaquant.megatron.cpu.attention import SDPAttention
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    class MyAttention(SDPAttention):
        pass

    model = build_gpt_model(tiny_gpt_config(), None, core_attention=MyAttention)
    with pytest.raises(ValueError, match=r"core_attention is a .*MyAttention.*no known place"):
        megaquant.quantize(model, KV_ONLY, lambda m: None)


@pytest.mark.parametrize("name, fmt", [("fp8_kv", "fp8"), ("nvfp4_fp8kv", "fp8"),
                                       ("nvfp4_nvfp4kv", "nvfp4")])
def test_kv_quant_ready_recipes(name, fmt):
    from megaquant.recipe import Recipe, load_recipe

    recipe = load_recipe(name)
    assert recipe.kv_cache.format == fmt and recipe.kv_cache.scale == "calibrated"
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.resolve("decoder.layers.0.self_attention.core_attention")["k"].format == fmt


class _Attention(torch.nn.Module):
    """A core-attention double: returns what it received."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None):
        return query, key, value


class _Renamed(torch.nn.Module):
    def forward(self, q, k, v, attention_mask):
        return q, k, v


def test_kv_quant_finds_key_and_value_by_name_positional_or_keyword():
    from megaquant.nn.attention import QuantCoreAttentionMixin

    class QuantAttention(QuantCoreAttentionMixin, _Attention):
        pass

    attn = QuantAttention()
    assert QuantAttention.kv_positions() == {"key": 1, "value": 2}
    fmt = get_format("fp8")
    attn.k_quantizer.configure(fmt, "dynamic")  # only K on: V must pass through untouched
    q, k, v = (torch.randn(4, 1, 2, 8) for _ in range(3))
    want_k = fmt.fake_quantize(k)
    assert not torch.equal(want_k, k)
    for out in (attn(q, k, v, None), attn(q, key=k, value=v, attention_mask=None)):
        assert out[0] is q and out[2] is v and torch.equal(out[1], want_k)


def test_kv_quant_refuses_a_core_attention_without_key_and_value_parameters():
    from megaquant.nn.attention import QuantCoreAttentionMixin

    class QuantRenamed(QuantCoreAttentionMixin, _Renamed):
        pass

    with pytest.raises(TypeError, match=r"_Renamed.forward has no parameter\(s\) \['key', "
                                        r"'value'\] \(it has \['q', 'k', 'v', "):
        QuantRenamed()


def test_kv_quant_local_dot_product_attention_finds_key_and_value():
    """Megatron's local DotProductAttention (GPU only: its forward allocates on CUDA) takes the
    keys and values where the quantized subclass looks for them."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megaquant.convert import QUANT_MODULES, register_builtins
    from megaquant.nn.attention import QuantDotProductAttention, QuantSDPAttention

    register_builtins()
    assert QUANT_MODULES[DotProductAttention] is QuantDotProductAttention
    assert QuantDotProductAttention.kv_positions() == {"key": 1, "value": 2}
    assert QuantSDPAttention.kv_positions() == {"key": 1, "value": 2}
