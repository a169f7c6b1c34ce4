"""NeMo 2's ``ModelTransform`` adapter on a wrapped model shaped like NeMo's.

NeMo's callback calls ``pl_module.model_transform(trainer.model)`` once, at the first train
epoch, on the wrapped model (``MegatronParallel``, an ``nn.ModuleList`` of DDP/Float16Module
wrapped chunks). Reference: ``megaquant.quantize`` on the bare model with the same weights.
"""

import pytest
import torch
from torch import nn

from tests.integrations.bridge_doubles import DDPDouble, Float16ModuleDouble

CALIB = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))]


def _model():
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(0)
    return build_gpt_model(tiny_gpt_config(), tp_size=1)


def _loop(m):
    with torch.no_grad():
        for t in CALIB:
            m(t, None, None)


class _ModelTransformCallback:  # the part of nemo.lightning's ModelTransform that matters
    def __init__(self, pl_module):
        self.transform = pl_module.model_transform

    def on_train_epoch_start(self, trainer_model):
        self.transform(trainer_model)  # the return value is ignored: must work in place


def test_transform_quantizes_a_wrapped_nemo_model_in_place(megatron_single):
    import megaquant
    from megaquant.integrations.nemo import QuantizeTransform
    from megaquant.quantizer import iter_quantizers

    ref = _model()
    megaquant.quantize(ref, "nvfp4", _loop)
    inner = _model()
    parallel = nn.ModuleList([DDPDouble(None, Float16ModuleDouble(None, inner))])
    pl_module = type("LightningModule", (), {})()
    pl_module.model_transform = QuantizeTransform({"quantization": "nvfp4"}, forward_loop=_loop)
    _ModelTransformCallback(pl_module).on_train_epoch_start(parallel)
    got = {n: q.amax for n, q in iter_quantizers(inner) if q.has_amax}
    want = {n: q.amax for n, q in iter_quantizers(ref) if q.has_amax}
    assert want and got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert parallel[0].module.module is inner  # wrappers kept, same module converted
    with pytest.raises(RuntimeError, match="already quantized this model"):
        pl_module.model_transform(parallel)


def test_model_chunks_unwraps_lists_and_wrappers():
    from megaquant.integrations.nemo import model_chunks

    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    lightning = type("GPT", (nn.Module,), {})()
    lightning.module = nn.ModuleList([DDPDouble(None, a), Float16ModuleDouble(None, b)])
    assert model_chunks(lightning) == [a, b]
    assert model_chunks([DDPDouble(None, a)]) == [a]
