"""Quantize a NeMo / Megatron-Bridge model for QAT at set-up, from that framework's own config.

Which versions: NeMo 2 (``nemo.collections.llm``, NeMo 24.x/25.x containers) and Megatron-Bridge
build plain Megatron-Core ``GPTModel``s, which is what megaquant converts; call
:func:`quantize_for_training` on the model (or list of model chunks) they hand you, after the
weights are loaded and before the optimizer is built. The ``nemo-toolkit`` 3.0 wheel on PyPI has
no LLM collection (``nemo.collections.llm`` is gone), so nothing here imports NeMo: this module
only reads configs (an OmegaConf ``DictConfig``, a dataclass, a dict, a recipe name) and walks
modules, and works with whichever release built the model. Tested here with OmegaConf configs
and dataclasses on megaquant's own GPT (no NeMo install).

A NeMo-style model config carries the recipe as ``model.quantization`` (``null``: train
unquantized); pass either that node or the whole model config.

    from megaquant.integrations.nemo import quantize_for_training
    report = quantize_for_training(model, cfg.model, forward_loop=calib_loop, dp_group=dp)

Only linears whose class megaquant knows are converted (Megatron's local Column/RowParallel
linears, TE's linears where TE is installed); the report names what was skipped.

NeMo 2's generic user hook is the ``ModelTransform`` Lightning callback: at the first train (or
validation) epoch it calls ``pl_module.model_transform(trainer.model)`` on the already wrapped
model, after the checkpoint was restored and the optimizer built. :class:`QuantizeTransform` is
such a ``model_transform``: it unwraps the chunks, converts them in place (no parameter is added,
so the optimizer built before still holds every parameter) and returns the model::

    model.model_transform = QuantizeTransform(cfg.model, forward_loop=calib_loop)
    trainer = nl.Trainer(..., callbacks=[nl_callbacks.ModelTransform()])

``nemo.collections.llm`` ships in nemo-toolkit up to 2.7.x only; the transform refuses an
installed release outside the recorded contract (:mod:`.contract`). For Megatron-Bridge use
:mod:`.bridge`, which quantizes before wrapping, the optimizer and the checkpoint load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from torch import nn


def recipe_from_config(cfg: Any) -> dict | str | None:
    """The recipe a config asks for: a dict, a built-in name, or None (no quantization).

    Accepts a recipe node (has ``rules``), a model config holding ``quantization``, a recipe
    name or YAML path, None, an OmegaConf node or a dataclass of either.
    """
    if cfg is None or isinstance(cfg, (str, Path)):
        return None if cfg is None else str(cfg)
    cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"quantization config must be a mapping, dataclass, name or None, got "
                        f"{type(cfg).__name__}")
    if "rules" in cfg:
        return cfg
    if "quantization" in cfg:
        return recipe_from_config(cfg["quantization"])
    raise ValueError(f"config has neither 'rules' (a recipe) nor 'quantization' (a model config "
                     f"with a recipe); keys: {sorted(cfg)}")


def _plain(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    from omegaconf import DictConfig, OmegaConf  # a dependency, via hydra-core

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / Float16Module wrappers (each keeps it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def model_chunks(model: "nn.Module | list") -> list[nn.Module]:
    """The Megatron model chunks inside ``model``, unwrapped.

    Follows ``.module`` (DDP, Float16Module, a NeMo LightningModule) and descends into lists and
    ``nn.ModuleList``s (NeMo's ``MegatronParallel`` is one, a chunk per virtual pipeline stage).
    """
    if isinstance(model, (list, tuple, nn.ModuleList)):
        return [c for m in model for c in model_chunks(m)]
    inner = unwrap(model)
    return model_chunks(inner) if isinstance(inner, nn.ModuleList) else [inner]


@dataclasses.dataclass
class QuantizeTransform:
    """A NeMo 2 ``model_transform`` (see the module docstring): quantize, return the model.

    ``cfg``, ``forward_loop``, ``init_from`` as for :func:`quantize_for_training`; ``dp_group``
    may be a zero-argument callable, resolved when the transform runs. ``check_version``:
    refuse an installed nemo-toolkit outside the contract (3.0 has no LLM collection).
    """

    cfg: Any
    forward_loop: Callable[[nn.Module], None] | None = None
    init_from: str | Path | None = None
    dp_group: Any = None
    check_version: bool = True
    calls: int = 0

    def __call__(self, model):
        from megaquant.integrations.contract import check_release

        if self.check_version:
            check_release("nemo-toolkit")
        if self.calls:
            raise RuntimeError("QuantizeTransform already quantized this model; NeMo's "
                               "ModelTransform calls model_transform once: do not call it again")
        group = self.dp_group() if callable(self.dp_group) else self.dp_group
        quantize_for_training(model_chunks(model), self.cfg, self.forward_loop, dp_group=group,
                              init_from=self.init_from)
        self.calls += 1
        return model


def quantize_for_training(model: "nn.Module | list[nn.Module]", cfg: Any,
                          forward_loop: Callable[[nn.Module], None] | None = None, *,
                          dp_group=None, init_from: str | Path | None = None):
    """Quantize ``model`` (or each chunk of a list) in place for QAT; returns the report(s).

    ``init_from``: a megaquant PTQ directory whose calibrated state is loaded instead of
    calibrating (its recipe must equal ``cfg``'s; a different one is an error naming both).
    Returns None when the config asks for no quantization.
    """
    import megaquant
    from megaquant.megatron.checkpoint import load_checkpoint
    from megaquant.ptq import restore
    from megaquant.train.state import check_compatible

    recipe = recipe_from_config(cfg)
    if recipe is None:
        return None
    chunks = [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    reports = []
    for chunk in chunks:
        if init_from is not None:
            # Refuse a PTQ output made with another recipe before touching the model.
            check_compatible(Path(init_from), recipe_dict(recipe), kind="ptq")
            reports.append(restore(chunk, recipe))
            load_checkpoint(chunk, init_from)
        else:
            reports.append(megaquant.quantize(chunk, recipe, forward_loop, dp_group=dp_group))
    return reports if isinstance(model, (list, tuple)) else reports[0]


def recipe_dict(recipe: dict | str) -> dict:
    """A recipe as the mapping a checkpoint's metadata stores (built-in names read from YAML)."""
    if isinstance(recipe, dict):
        return recipe
    import yaml

    from megaquant.recipe import RECIPE_DIR, load_recipe

    load_recipe(recipe)  # validates the name, with the list of valid ones on error
    path = (Path(recipe) if str(recipe).endswith((".yaml", ".yml"))
            else RECIPE_DIR / f"{recipe}.yaml")
    return yaml.safe_load(path.read_text())
