"""PTQ inside Megatron-Bridge, following Bridge's own flow: build without DDP, calibrate, save.

Bridge's quantization example builds the model with ``provide_distributed_model(wrap_with_ddp=
False)`` from a provider that loads the HF weights (``AutoBridge.to_megatron_provider(
load_weights=True)``), calibrates with a user forward loop and saves with
``save_megatron_model``. :func:`quantize_and_save` does the same with megaquant:

1. ``attach`` registers the pre-wrap hook, *after* Bridge's weight-loading hook, so Bridge builds
   the chunks with quantized linears (amax empty);
2. the model is built without DDP; the hook must have run (``check_applied``);
3. calibration runs on the unwrapped chunk once the weights are in (the recipe's algorithm, then
   max calibration, as :func:`megaquant.quantize` does), with the data-parallel group given;
4. ``save_megatron_model`` writes the weights *and* the amax buffers (they are part of every
   quantized layer's ``sharded_state_dict``), and ``megaquant.json`` beside it names the recipe.

A QAT run then attaches the same recipe with ``init_from=<that directory>`` and points Bridge's
``checkpoint.pretrained_checkpoint`` at it: the hook checks the recipe and primes the amax
buffers, Bridge's normal checkpoint load fills them (``examples/bridge_qat.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from megaquant.integrations.bridge import attach, calibrate_chunks, write_recipe_record


def _bridge_save(model: list, path: str) -> None:
    from megatron.bridge.training.model_load_save import save_megatron_model

    save_megatron_model(model, path)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def quantize_and_save(provider: Any, recipe: Any, forward_loop: Callable[[nn.Module], None],
                      save_to: str | Path, *, dp_group: Any = None,
                      save: Callable[[list, str], None] | None = None,
                      build_kwargs: dict | None = None) -> list:
    """Build ``provider``'s model quantized with ``recipe``, calibrate it, save it; return it.

    ``forward_loop(chunk)`` runs the calibration batches through the unwrapped model chunk.
    ``dp_group``: the data-parallel group (or a callable returning it). ``save(model, path)``
    defaults to Bridge's ``save_megatron_model``; ``build_kwargs`` go to
    ``provide_distributed_model`` (``wrap_with_ddp=False`` is always set).
    """
    hook = attach(provider, recipe, dp_group=dp_group)
    model = provider.provide_distributed_model(**{**(build_kwargs or {}), "wrap_with_ddp": False})
    hook.check_applied(model)
    calibrate_chunks(model, hook.recipe, forward_loop, hook.group())
    (save or _bridge_save)(model, str(save_to))
    _barrier()
    write_recipe_record(save_to, hook.recipe, rank0=_is_rank0())
    _barrier()
    return model
