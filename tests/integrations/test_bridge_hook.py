"""The Megatron-Bridge pre-wrap hook on megaquant's own GPT, through Bridge's protocol doubles.

Reference: ``megaquant.quantize`` called directly on a model with the same weights; amax values
must be bit-identical (same steps, same order). Weights arrive the way AutoBridge brings HF
weights: through a pre-wrap hook registered before megaquant's.
"""

import pytest
import torch
import yaml

from megaquant.recipe import RECIPE_DIR
from tests.integrations.bridge_doubles import (
    Float16ModuleDouble,
    ModelConfigDouble,
    ProviderDouble,
)

CALIB = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
         for _ in range(2)]
EVAL = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))]


def _build(seed=5):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(seed)
    return [build_gpt_model(tiny_gpt_config(), tp_size=1)]


@pytest.fixture(scope="module")
def weights(megatron_single):
    return {k: v.clone() for k, v in _build(0)[0].state_dict().items()
            if isinstance(v, torch.Tensor)}


def _weights_hook(weights):
    def load(model):  # stands for AutoBridge's HF weight loading hook
        for chunk in model:
            chunk.load_state_dict(weights, strict=False)
        return model

    return load


def _loop(m):
    with torch.no_grad():
        for t in CALIB:
            m(t, None, None)


def _amax(model):
    from megaquant.integrations.nemo import unwrap
    from megaquant.quantizer import iter_quantizers

    return {n: q.amax.clone() for n, q in iter_quantizers(unwrap(model)) if q.has_amax}


def _loss(model):
    from megaquant.evaluate import evaluate_loss
    from megaquant.integrations.nemo import unwrap

    return evaluate_loss(unwrap(model), EVAL, None)


def _reference(weights, recipe):
    import megaquant

    model = _build()[0]
    model.load_state_dict(weights, strict=False)
    megaquant.quantize(model, recipe, _loop)
    return model


def _assert_same_amax(got, want):
    assert want and got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _recipe(name):
    return yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())


def test_hook_on_provider_calibrates_before_wrapping(weights):
    from megaquant.integrations.bridge import attach

    provider = ProviderDouble(_build)
    provider.register_pre_wrap_hook(_weights_hook(weights))
    hook = attach(provider, "nvfp4", forward_loop=_loop)
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    assert provider.events == ["build", "pre_wrap_hook", "float16_module"]
    assert isinstance(model[0], Float16ModuleDouble)
    hook.check_applied(model)
    ref = _reference(weights, "nvfp4")
    _assert_same_amax(_amax(model[0]), _amax(ref))
    assert _loss(model[0]) == _loss(ref)


def test_hook_on_model_config_list_and_prepend(weights):
    from megaquant.integrations.bridge import attach

    cfg = ModelConfigDouble(_build)
    load = _weights_hook(weights)
    cfg.pre_wrap_hooks.append(load)
    hook = attach(cfg, "int8", forward_loop=_loop)
    assert cfg.pre_wrap_hooks == [load, hook]
    model = cfg.build_distributed_models(wrap_with_ddp=True)
    assert cfg.events == ["build", "pre_wrap_hook", "float16_module", "ddp"]
    _assert_same_amax(_amax(model[0]), _amax(_reference(weights, "int8")))
    first = attach(ModelConfigDouble(_build), "int8", prepend=True)
    assert first.recipe == _recipe("int8")


def test_bf16_wrapping_keeps_float32_scales(weights, tmp_path):
    """Megatron's Float16Module casts the hooked chunk to bf16; calibrated and loaded amax stay
    float32 (they were rounded to bf16 before the quantizer kept them out of dtype casts)."""
    from megaquant.integrations.bridge import attach, write_recipe_record
    from megaquant.integrations.nemo import unwrap
    from megaquant.megatron.checkpoint import load_checkpoint, save_checkpoint

    provider = ProviderDouble(_build, bf16=True)
    provider.register_pre_wrap_hook(_weights_hook(weights))
    attach(provider, "nvfp4", forward_loop=_loop)
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    assert unwrap(model[0]).decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    want = _amax(_reference(weights, "nvfp4"))
    assert type(model[0]).__name__ == "Float16Module"
    assert all(v.dtype == torch.float32 for v in _amax(model[0]).values())
    _assert_same_amax(_amax(model[0]), want)
    ref = _reference(weights, "nvfp4")
    save_checkpoint(ref, tmp_path / "ptq", metadata={})
    write_recipe_record(tmp_path / "ptq", _recipe("nvfp4"))
    again = ProviderDouble(_build, bf16=True)
    attach(again, "nvfp4", init_from=tmp_path / "ptq")
    restored = again.provide_distributed_model(wrap_with_ddp=False)
    load_checkpoint(unwrap(restored[0]), tmp_path / "ptq")  # Bridge loads after wrapping
    _assert_same_amax(_amax(restored[0]), want)


def test_hook_returns_the_list_it_was_given(megatron_single):
    from megaquant.integrations.bridge import pre_wrap_hook

    chunks = _build()
    assert pre_wrap_hook("nvfp4")(chunks) is chunks


def test_unquantized_checkpoint_loads_into_hooked_model(weights, tmp_path):
    from megaquant.integrations.bridge import attach, calibrate_chunks
    from megaquant.integrations.nemo import unwrap
    from megaquant.megatron.checkpoint import load_checkpoint, save_checkpoint

    plain = _build(0)[0]
    save_checkpoint(plain, tmp_path / "plain", metadata={})
    provider = ProviderDouble(_build)
    hook = attach(provider, "nvfp4")
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    assert _amax(model[0]) == {}  # built, nothing calibrated: nothing to find in a checkpoint
    load_checkpoint(unwrap(model[0]), tmp_path / "plain")  # no scale keys there: loads
    with pytest.raises(RuntimeError, match="static but has no amax"):
        _loss(model[0])
    calibrate_chunks(model, hook.recipe, _loop, None)  # after the weights are in
    _assert_same_amax(_amax(model[0]), _amax(_reference(weights, "nvfp4")))


@pytest.mark.parametrize("writer", ["megaquant", "megatron-bridge"])
def test_checkpoint_saved_after_hook_loads_into_hooked_model(weights, tmp_path, writer):
    from megaquant.integrations.bridge import attach, write_recipe_record
    from megaquant.integrations.nemo import unwrap
    from megaquant.megatron.checkpoint import load_checkpoint, save_checkpoint

    src = ProviderDouble(_build)
    src.register_pre_wrap_hook(_weights_hook(weights))
    attach(src, "nvfp4", forward_loop=_loop)
    saved = unwrap(src.provide_distributed_model(wrap_with_ddp=False)[0])
    save_checkpoint(saved, tmp_path / "ptq", metadata={"kind": "ptq",
                                                      "recipe_config": _recipe("nvfp4")})
    if writer == "megatron-bridge":  # the record quantize_and_save writes beside Bridge's save
        write_recipe_record(tmp_path / "ptq", _recipe("nvfp4"))
    dst = ProviderDouble(_build)  # other random weights: everything must come from the file
    attach(dst, "nvfp4", init_from=tmp_path / "ptq")
    model = dst.provide_distributed_model(wrap_with_ddp=False)
    if writer == "megatron-bridge":  # primed with zeros; Bridge's own load fills them
        assert all(not v.any() for v in _amax(model[0]).values())
        load_checkpoint(unwrap(model[0]), tmp_path / "ptq")
    _assert_same_amax(_amax(model[0]), _amax(saved))
    assert _loss(model[0]) == _loss(saved)


def test_ptq_checkpoint_of_another_recipe_names_both(weights, tmp_path):
    import megaquant
    from megaquant.integrations.bridge import attach
    from megaquant.megatron.checkpoint import save_checkpoint

    model = _build(0)[0]
    megaquant.quantize(model, "int8", _loop)
    save_checkpoint(model, tmp_path / "ptq", metadata={"recipe_config": _recipe("int8")})
    provider = ProviderDouble(_build)
    attach(provider, "nvfp4", init_from=tmp_path / "ptq")
    with pytest.raises(ValueError, match=r"'int8' \(input int8, weight int8\).*'nvfp4'"):
        provider.provide_distributed_model(wrap_with_ddp=False)


def test_config_without_hook_mechanism_is_refused_by_name(megatron_single):
    from megaquant.integrations.bridge import attach

    class TrainerConfig:  # neither register_pre_wrap_hook nor pre_wrap_hooks
        pre_wrap_hooks = None

    with pytest.raises(TypeError, match="TrainerConfig has neither register_pre_wrap_hook"):
        attach(TrainerConfig(), "nvfp4")
    with pytest.raises(TypeError, match=r"built model \(GPTModel\)"):
        attach(_build(), "nvfp4")
    with pytest.raises(TypeError, match=r"built model \(GPTModel\)"):
        attach(Float16ModuleDouble(None, _build()[0]), "nvfp4")


def test_hook_attached_after_build_is_an_error(megatron_single):
    from megaquant.integrations.bridge import attach, pre_wrap_hook

    provider = ProviderDouble(_build)
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    hook = attach(provider, "nvfp4")
    with pytest.raises(RuntimeError, match="attached after the model was built"):
        hook.check_applied(model)
    with pytest.raises(RuntimeError, match=r"already wrapped \(Float16ModuleDouble\).*attached "
                                           "after the model was built"):
        pre_wrap_hook("nvfp4")(model)


def test_hook_registered_twice_and_bad_arguments(megatron_single):
    from megaquant.integrations.bridge import attach, calibrate_chunks, pre_wrap_hook

    provider = ProviderDouble(_build)
    attach(provider, "nvfp4")
    attach(provider, "nvfp4")
    with pytest.raises(RuntimeError, match="already quantized.*registered twice"):
        provider.provide_distributed_model(wrap_with_ddp=False)
    with pytest.raises(ValueError, match="forward_loop.*init_from.*not both"):
        pre_wrap_hook("nvfp4", _loop, init_from="x")
    with pytest.raises(ValueError, match="one chunk, got 2"):
        calibrate_chunks(_build() + _build(), _recipe("nvfp4"), _loop, None)
    with pytest.raises(ValueError, match=r"no quantization \(quantization: null\)"):
        pre_wrap_hook({"quantization": None})
    assert pre_wrap_hook({"quantization": "int8"}).recipe == _recipe("int8")
    with pytest.raises(TypeError, match="list of model chunks, got GPTModel"):
        pre_wrap_hook("nvfp4")(_build()[0])
