"""Learnable-scale options: bad values and formats without a scale to learn are refused with
the option's name and what fits; the scale parameters get their own AdamW group."""

import pytest
import torch


def test_config_refuses_bad_values_and_unknown_keys():
    from megaquant.train.config import LearnableScalesConfig

    with pytest.raises(ValueError, match="model.learnable_scales.lr_scale must be > 0"):
        LearnableScalesConfig(enabled=True, lr_scale=0)
    with pytest.raises(ValueError, match="model.learnable_scales"):
        LearnableScalesConfig.from_dict({"enabled": True, "per_blok": True})
    assert LearnableScalesConfig.from_dict(None) == LearnableScalesConfig()


@pytest.mark.parametrize("recipe,per_block,match", [
    ("mxfp8", False, r"mxfp8: .*powers of two"),
    ("int4_w4a16", False, r"int4 has no per-tensor scale.*per_block: true"),
])
def test_formats_without_a_scale_to_learn_are_refused(megatron_single, recipe, per_block, match):
    from megaquant.train.config import LearnableScalesConfig
    from megaquant.train.learnable import enable_learnable_scales
    from tests.qat import helpers as h

    model = h.build(megatron_single, h.full_state(), recipe=recipe)
    with pytest.raises(ValueError, match=r"quantizer .*linear.*" + match.split(":")[0]):
        enable_learnable_scales(model, LearnableScalesConfig(enabled=True, per_block=per_block))
    with pytest.raises(ValueError, match=match):
        enable_learnable_scales(model, LearnableScalesConfig(enabled=True, per_block=per_block))


def test_scales_get_their_own_group_without_decay(megatron_single):
    from megaquant.train.config import LearnableScalesConfig
    from megaquant.train.learnable import enable_learnable_scales
    from megaquant.train.optim import build_optimizer, set_lr
    from tests.qat import helpers as h

    model = h.build(megatron_single, h.full_state(), recipe="int4_w4a16")
    n = enable_learnable_scales(model, LearnableScalesConfig(enabled=True, per_block=True))
    scales = [p for p in model.parameters() if getattr(p, "quant_scale", False)]
    assert n == len(scales) > 0 and all(p.requires_grad for p in scales)
    opt = build_optimizer(model, h.settings()[1], scale_lr_scale=4.0)
    set_lr(opt, 1e-3)
    group = [g for g in opt.param_groups if any(p is scales[0] for p in g["params"])]
    assert len(group) == 1 and group[0]["weight_decay"] == 0.0
    assert group[0]["lr"] == pytest.approx(4e-3)
    assert {id(p) for p in group[0]["params"]} == {id(p) for p in scales}
    others = [g for g in opt.param_groups if g is not group[0]]
    assert all(g["lr"] == pytest.approx(1e-3) for g in others)
    assert torch.is_tensor(scales[0]) and scales[0].dtype == torch.float32


@pytest.mark.parametrize("recipe", ["nvfp4", "int4_w4a16"])
def test_export_writes_the_learned_scales(megatron_single, recipe):
    """The exporter's codes decode to the learned forward (reference: the model's own fake-
    quantized weights with the learned amax and block amax), not to the calibrated one."""
    from megaquant.export.export import collect
    from megaquant.train.config import LearnableScalesConfig
    from megaquant.train.learnable import enable_learnable_scales
    from tests.export.export_helpers import quantized_tiny

    model, cfg = quantized_tiny(recipe, megatron_single.dp_group)
    enable_learnable_scales(model, LearnableScalesConfig(enabled=True, per_block=True))
    g = torch.Generator().manual_seed(0)
    layer = model.decoder.layers[0].mlp.linear_fc2
    calibrated = layer.weight_quantizer(layer.weight).detach()
    with torch.no_grad():  # stand-in for training: move every learned scale
        for p in model.parameters():
            if getattr(p, "quant_scale", False):
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
    learned = layer.weight_quantizer(layer.weight).detach()
    assert not torch.equal(learned, calibrated)
    _, quantized, _ = collect(model, cfg)  # raises if any layer's codes differ from the forward
    fc2 = [q for q in quantized if q.name.endswith("layers.0.mlp.down_proj")]
    assert len(fc2) == 1
    from megaquant.formats import get_format

    assert torch.equal(get_format(layer.weight_quantizer.fmt.name,
                                  block_size=layer.weight_quantizer.fmt.block_size)
                       .dequantize(fc2[0].weight), learned)


def test_resume_with_other_learnable_settings_is_refused():
    from megaquant.train.config import LearnableScalesConfig
    from megaquant.train.learnable import check_resume

    on = LearnableScalesConfig(enabled=True, per_block=True)
    record = {"metadata": {"learnable_scales": {"enabled": True, "per_block": True,
                                                "lr_scale": 1.0}}}
    check_resume(record, on, "ckpt")  # same settings (lr_scale may change)
    check_resume({"metadata": {}}, LearnableScalesConfig(), "ckpt")  # older checkpoints
    with pytest.raises(ValueError, match=r"ckpt was trained with model.learnable_scales"):
        check_resume({"metadata": {}}, on, "ckpt")
    with pytest.raises(ValueError, match=r"'per_block': True.*'per_block': False"):
        check_resume(record, LearnableScalesConfig(enabled=True), "ckpt")
