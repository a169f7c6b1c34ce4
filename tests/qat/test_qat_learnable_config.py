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
