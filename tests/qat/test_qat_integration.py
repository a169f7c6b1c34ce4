"""The NeMo / Megatron-Bridge entry point: configs in the forms those frameworks hold them,
against megaquant.quantize called directly (the reference)."""

from dataclasses import dataclass, field

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from megaquant.recipe import RECIPE_DIR


def _model():
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(0)
    return build_gpt_model(tiny_gpt_config(), tp_size=1)  # Megatron's own linears: converted


def _amax(model):
    from megaquant.quantizer import iter_quantizers

    return {n: q.amax.clone() for n, q in iter_quantizers(model) if q.has_amax}


CALIB = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))]


def _loop(m):
    with torch.no_grad():
        for t in CALIB:
            m(t, None, None)


@dataclass
class _ModelCfg:  # a Megatron-Bridge-like dataclass config with a quantization field
    quantization: dict = field(default_factory=lambda: yaml.safe_load(
        (RECIPE_DIR / "nvfp4.yaml").read_text()))


class _Wrapper(torch.nn.Module):  # stands for DDP / Float16Module
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_entry_point_accepts_omegaconf_dataclass_and_wrapped_models(megatron_single):
    import megaquant
    from megaquant.integrations.nemo import quantize_for_training

    ref = _model()
    megaquant.quantize(ref, "nvfp4", _loop)
    want = _amax(ref)
    assert want
    recipe = yaml.safe_load((RECIPE_DIR / "nvfp4.yaml").read_text())
    for cfg in (OmegaConf.create({"micro_batch_size": 1, "quantization": recipe}),
                OmegaConf.create(recipe), _ModelCfg(), "nvfp4"):
        model = _model()
        quantize_for_training([_Wrapper(model)], cfg, _loop)
        got = _amax(model)
        assert got.keys() == want.keys()
        for k in got:
            assert torch.equal(got[k], want[k]), (type(cfg).__name__, k)


def test_entry_point_null_quantization_leaves_model_alone(megatron_single):
    from megaquant.integrations.nemo import quantize_for_training

    model = _model()
    before = type(model.decoder.layers[0].mlp.linear_fc1)
    assert quantize_for_training(model, OmegaConf.create({"quantization": None})) is None
    assert type(model.decoder.layers[0].mlp.linear_fc1) is before


def test_init_from_ptq_with_another_recipe_names_both(megatron_single, tmp_path):
    import megaquant
    from megaquant.integrations.nemo import quantize_for_training
    from megaquant.megatron.checkpoint import save_checkpoint

    model = _model()
    megaquant.quantize(model, "int8", _loop)
    recipe = yaml.safe_load((RECIPE_DIR / "int8.yaml").read_text())
    save_checkpoint(model, tmp_path / "ptq", metadata={"recipe_config": recipe})
    with pytest.raises(ValueError, match=r"'int8' \(input int8, weight int8\).*'nvfp4'"):
        quantize_for_training(_model(), "nvfp4", init_from=tmp_path / "ptq")
    # The matching recipe loads the calibrated state: same amax as the saved model.
    fresh = _model()
    quantize_for_training(fresh, recipe, init_from=tmp_path / "ptq")
    assert _amax(fresh).keys() == _amax(model).keys() and _amax(model)
    for k, v in _amax(model).items():
        assert torch.equal(_amax(fresh)[k], v)
