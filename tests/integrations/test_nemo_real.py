"""QuantizeTransform through NeMo's real ``ModelTransform`` callback (nemo-toolkit 2.7.x).

Skipped unless NeMo's Lightning part imports. It does on a CPU machine in a separate venv
(docs/integrations.md: ``pip install "nemo-toolkit[lightning]==2.7.3"`` next to megaquant's
torch and megatron-core); ``nemo.collections.llm`` itself does not import there.
"""

import pytest
import torch

model_transform = pytest.importorskip("nemo.lightning.pytorch.callbacks.model_transform")


def test_real_model_transform_callback_quantizes_in_place(megatron_single):
    import lightning.pytorch as pl

    import megaquant
    from megaquant.integrations.nemo import QuantizeTransform
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.quantizer import iter_quantizers

    calib = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))]

    def loop(m):
        with torch.no_grad():
            for t in calib:
                m(t, None, None)

    def gpt():
        torch.manual_seed(0)
        return build_gpt_model(tiny_gpt_config(), tp_size=1)

    class DDP(torch.nn.Module):  # not from tests.*: the nemo wheel ships a top-level `tests`
        def __init__(self, module):
            super().__init__()
            self.module = module

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.module = gpt()
            self.model_transform = QuantizeTransform("nvfp4", forward_loop=loop)

    ref = gpt()
    megaquant.quantize(ref, "nvfp4", loop)
    pl_module = Module()
    trainer = type("Trainer", (), {"model": torch.nn.ModuleList([DDP(pl_module)]),
                                    "lightning_module": pl_module})()
    callback = model_transform.ModelTransform()
    callback.setup(trainer, pl_module, "fit")
    callback.on_train_epoch_start(trainer, pl_module)
    callback.on_train_epoch_start(trainer, pl_module)  # NeMo calls it once: counted
    got = {n: q.amax for n, q in iter_quantizers(pl_module.module) if q.has_amax}
    want = {n: q.amax for n, q in iter_quantizers(ref) if q.has_amax}
    assert want and got.keys() == want.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items())
