"""QAT of a megaquant PTQ checkpoint with Megatron-Bridge's ``pretrain`` (GPU machine with Bridge).

    torchrun --nproc-per-node=8 examples/bridge_qat.py --recipe nvfp4 \
        --init-from /ckpt/llama32-1b-nvfp4 \
        train.train_iters=200 optimizer.lr=1e-5 model.tensor_model_parallel_size=2 \
        checkpoint.save=/ckpt/llama32-1b-nvfp4-qat

Trailing arguments are Bridge's Hydra-style overrides of its ``ConfigContainer``
(``section.field=value``), applied with Bridge's ``process_config_with_overrides`` as its own
recipe scripts do. ``attach`` registers megaquant's pre-wrap hook on ``cfg.model`` (a provider,
or a ``ModelConfig`` with a ``pre_wrap_hooks`` list) before ``pretrain`` builds anything. In
``setup`` the hook runs before the optimizer is built and before the checkpoint is loaded: it
checks that ``--init-from`` was made with ``--recipe`` (an error names both otherwise) and
primes the amax buffers, which Bridge's load of ``checkpoint.pretrained_checkpoint`` (set to
``--init-from`` here) then fills from the PTQ checkpoint's own keys.
"""

import argparse

from megatron.bridge.recipes.llama import llama32_1b_pretrain_config
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

from megaquant.integrations.bridge import attach


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="nvfp4", help="the recipe the PTQ checkpoint was made with")
    p.add_argument("--init-from", required=True, help="a directory written by bridge_ptq.py")
    p.add_argument("--config-file", help="a Bridge YAML config merged before the overrides")
    args, overrides = p.parse_known_args()

    cfg = llama32_1b_pretrain_config()  # any Bridge recipe; the model must match the checkpoint
    cfg.checkpoint.pretrained_checkpoint = args.init_from
    cfg = process_config_with_overrides(cfg, config_filepath=args.config_file,
                                        cli_overrides=overrides)
    attach(cfg.model, args.recipe, init_from=args.init_from)
    pretrain(cfg, forward_step)


if __name__ == "__main__":
    main()
