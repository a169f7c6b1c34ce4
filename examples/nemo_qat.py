"""QAT inside NeMo 2 (nemo-toolkit <= 2.7.x; ``nemo.collections.llm`` is gone in 3.0).

    torchrun --nproc-per-node=8 examples/nemo_qat.py --recipe nvfp4 --init-from /ckpt/ptq \
        --restore /ckpt/llama32-1b-nemo

NeMo's generic user hook is the ``ModelTransform`` callback: at the first training epoch it
calls ``model.model_transform(trainer.model)`` on the already wrapped model, after the
checkpoint is restored. ``QuantizeTransform`` unwraps the chunks, converts them in place (no new
parameters, so the optimizer NeMo built already holds them all) and loads the calibrated state
from a megaquant PTQ directory (``scripts/ptq.py``; or give it a ``forward_loop`` to calibrate).
Written against the nemo-toolkit 2.7.3 sources; not run here (NeMo 2 needs a CUDA machine).
"""

import argparse

from nemo import lightning as nl
from nemo.collections import llm
from nemo.lightning.pytorch.callbacks import ModelTransform

from megaquant.integrations.nemo import QuantizeTransform


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="nvfp4")
    p.add_argument("--init-from", required=True, help="a megaquant PTQ directory")
    p.add_argument("--restore", required=True, help="the NeMo checkpoint of the base model")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()

    model = llm.LlamaModel(llm.Llama32Config1B())
    model.model_transform = QuantizeTransform(args.recipe, init_from=args.init_from)
    trainer = nl.Trainer(
        devices=8, max_steps=args.steps, callbacks=[ModelTransform()],
        strategy=nl.MegatronStrategy(tensor_model_parallel_size=args.tp),
        plugins=nl.MegatronMixedPrecision(precision="bf16-mixed"))
    llm.finetune(model=model, data=llm.MockDataModule(seq_length=2048, global_batch_size=16),
                 trainer=trainer,
                 resume=nl.AutoResume(restore_config=nl.RestoreConfig(path=args.restore)))


if __name__ == "__main__":
    main()
