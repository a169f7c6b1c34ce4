"""QAT starts from the best PTQ of a format, not only from max calibration.

The calibration algorithms leave their result in ordinary state: SmoothQuant / AWQ fold their
per-channel factors into the previous norm or linear weight, GPTQ writes its rounded weights,
and every algorithm sets the amax. A PTQ checkpoint made with them (``scripts/ptq.py``,
``model.init_from``) therefore restores the whole PTQ model: reference = the PTQ model itself,
compared bit for bit (same weights, same amax, same kernels). The folded factors are then
plain weights, so QAT trains them (checked: the smoothed norm weights move in one step);
learnable scales start from the PTQ amax, so enabling them changes no output.
"""

import pytest
import torch
import yaml

from megaquant.recipe import RECIPE_DIR

CALIB = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
         for _ in range(2)]


def _model():
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(0)
    return build_gpt_model(tiny_gpt_config(), tp_size=1)


def _loop(m):
    with torch.no_grad():
        for t in CALIB:
            m(t, None, None)


def _logits(m):
    m.eval()
    with torch.no_grad():
        return m(CALIB[0], None, None)


@pytest.mark.parametrize("recipe_name", ["nvfp4_sq", "nvfp4_gptq"])
def test_qat_from_best_ptq_restores_it_and_trains_the_folded_state(megatron_single, tmp_path,
                                                                   recipe_name):
    import megaquant
    from megaquant.integrations.nemo import quantize_for_training
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.train.config import LearnableScalesConfig
    from megaquant.train.learnable import enable_learnable_scales
    from tests.qat import helpers as h

    recipe = yaml.safe_load((RECIPE_DIR / f"{recipe_name}.yaml").read_text())
    ptq = _model()
    original = {k: v.clone() for k, v in ptq.state_dict().items() if isinstance(v, torch.Tensor)}
    megaquant.quantize(ptq, recipe_name, _loop)
    changed = [k for k, v in ptq.state_dict().items()
               if k in original and not k.endswith("amax") and not torch.equal(v, original[k])]
    assert changed, f"{recipe_name} left every weight as it was: nothing to start from"
    save_checkpoint(ptq, tmp_path / "ptq", metadata={"recipe_config": recipe})

    student = _model()
    quantize_for_training(student, recipe, init_from=tmp_path / "ptq")
    want = _logits(ptq)
    assert torch.equal(_logits(student), want)
    enable_learnable_scales(student, LearnableScalesConfig(enabled=True, per_block=True))
    assert torch.equal(_logits(student), want)

    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    h.train_records(megatron_single, student, steps=1)
    moved = [n for n in changed if n in before and
             not torch.equal(dict(student.named_parameters())[n], before[n])]
    assert moved, "the PTQ-rewritten weights are not trained"
