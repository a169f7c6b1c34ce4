"""Megatron-Bridge integration: a pre-wrap hook that quantizes the model chunks Bridge builds.

Where it plugs in. A Bridge model provider (``GPTModelProvider`` and friends, every release
0.3.0 .. 0.6.x) keeps a list of *pre-wrap hooks*; ``provide_distributed_model`` / ``get_model``
builds the model chunks (one per virtual pipeline stage), runs every hook as
``model = hook(model)`` and only then moves the chunks to the GPU, wraps them in
``Float16Module`` and DDP. From 0.5 the model config may instead be a Megatron ``ModelConfig``
with a plain ``pre_wrap_hooks`` list. In ``training/setup.py`` the hooks run after the user's
config is final, *before* the optimizer is built and *before* the checkpoint is loaded, so a
hook that swaps linears for quantized ones is seen by the optimizer and by the checkpoint
loader. ``tests/fixtures`` has none of this: the order is read from every released wheel with
``ast`` (``scripts/bridge_contract.py``) into ``megaquant/integrations/bridge_contract.json``
and tested there.

What the hook does to each chunk:

* always: converts Megatron's linears and configures their quantizers from the recipe, with
  *empty* amax buffers. An empty amax is left out of the checkpoint and an absent one loads as
  "not calibrated yet", so an unquantized checkpoint (an HF import, a pretrain run) loads into
  the hooked model;
* with ``forward_loop``: calibrates at once. Only right when the weights are already in: Bridge's
  ``AutoBridge.to_megatron_provider(load_weights=True)`` loads HF weights through its own
  pre-wrap hook, so a hook registered after it sees them;
* with ``init_from``: checks that the checkpoint was made with the same recipe, then gives every
  static quantizer an amax of its final shape (zeros, like :func:`megaquant.ptq.restore`) for a
  checkpoint to fill. A megaquant PTQ directory is loaded right away; a Bridge checkpoint written
  by :func:`megaquant.integrations.bridge_ptq.quantize_and_save` is loaded by Bridge itself
  (``checkpoint.pretrained_checkpoint``), which then finds the amax keys it expects.

The hook always returns the list it was given (Bridge's provider chains hooks without a
``None`` check). Nothing here imports Bridge at module import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from megaquant import manifest
from megaquant.integrations.contract import check_release
from megaquant.integrations.nemo import recipe_dict, recipe_from_config, unwrap

Chunks = list  # list[MegatronModule]: what Bridge hands a pre-wrap hook
BRIDGE_WRITER = "megatron-bridge"  # megaquant.json "writer" of a checkpoint Bridge saved


@dataclass
class PreWrapHook:
    """A callable ``hook(list[MegatronModule]) -> list[MegatronModule]`` for Bridge.

    Build it with :func:`pre_wrap_hook`; ``reports`` holds one conversion report per chunk once
    it ran, ``calls`` how often it ran (a hook that never ran was attached too late).
    """

    recipe: dict
    forward_loop: Callable[[nn.Module], None] | None = None
    init_from: Path | None = None
    dp_group: Any = None  # a process group, or a zero-argument callable returning one
    reports: list = field(default_factory=list)
    calls: int = 0

    def __call__(self, model: Chunks) -> Chunks:
        chunks = _chunks(model)
        source = _check_source(self.init_from, self.recipe) if self.init_from else None
        reports = [convert_chunk(c, self.recipe) for c in chunks]
        if self.forward_loop is not None:
            calibrate_chunks(chunks, self.recipe, self.forward_loop, self.group())
        elif source is not None:
            _restore_into(chunks, source)
        self.reports, self.calls = reports, self.calls + 1
        return model

    def group(self):
        """The data-parallel group, resolved when the hook runs (Bridge has set it up by then)."""
        return self.dp_group() if callable(self.dp_group) else self.dp_group

    def check_applied(self, model: Chunks) -> None:
        """Raise unless this hook quantized ``model`` (else it was attached after the build)."""
        from megaquant.nn.base import QuantModuleMixin

        chunks = [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
        if self.calls == 0 or not all(any(isinstance(m, QuantModuleMixin) for m in c.modules())
                                      for c in chunks):
            raise RuntimeError(
                f"the megaquant pre-wrap hook for recipe {self.recipe.get('name', 'custom')!r} "
                f"did not run on this model ({type(chunks[0]).__name__}): it was attached after "
                "the model was built; call attach(provider, recipe) before "
                "provide_distributed_model / pretrain")


def pre_wrap_hook(recipe: Any, forward_loop: Callable[[nn.Module], None] | None = None,
                  init_from: str | Path | None = None, *, dp_group: Any = None) -> PreWrapHook:
    """A Bridge pre-wrap hook quantizing every chunk with ``recipe`` (see the module docstring).

    ``recipe``: a built-in name, YAML path, mapping, or a config holding it as ``quantization``
    (read by :func:`megaquant.integrations.nemo.recipe_from_config`). ``forward_loop(chunk)``
    calibrates (one chunk only: virtual pipeline stages cannot be calibrated one by one).
    ``init_from``: a megaquant PTQ checkpoint, or a Bridge checkpoint saved by
    ``quantize_and_save``.
    ``dp_group``: the data-parallel group (or a callable returning it) for calibration.
    """
    if forward_loop is not None and init_from is not None:
        raise ValueError("pre_wrap_hook: give forward_loop (calibrate) or init_from (restore "
                         "calibrated scales), not both")
    if forward_loop is not None and not callable(forward_loop):
        raise TypeError(f"forward_loop must be callable, got {type(forward_loop).__name__}")
    resolved = recipe_from_config(recipe)
    if resolved is None:
        raise ValueError("pre_wrap_hook: the config asks for no quantization (quantization: "
                         "null); attach no megaquant hook to train unquantized")
    return PreWrapHook(recipe=recipe_dict(resolved), forward_loop=forward_loop,
                       init_from=Path(init_from) if init_from is not None else None,
                       dp_group=dp_group)


def attach(model_config: Any, recipe: Any, forward_loop=None, init_from=None, *,
           dp_group: Any = None, prepend: bool = False, check_version: bool = True
           ) -> PreWrapHook:
    """Register a megaquant pre-wrap hook on a Bridge model provider or ``ModelConfig``.

    Providers get ``register_pre_wrap_hook(hook, prepend=...)``; configs with a
    ``pre_wrap_hooks`` list get the hook appended (inserted first with ``prepend``), as Bridge's
    own ``_register_pre_wrap_hook`` does. Anything else, a built model included, is refused by
    name. ``check_version``: refuse an installed megatron-bridge outside the recorded contract.
    Returns the hook (``hook.check_applied(model)`` after building).
    """
    _refuse_built(model_config)
    if check_version:
        check_release("megatron-bridge")
    hook = pre_wrap_hook(recipe, forward_loop, init_from, dp_group=dp_group)
    register = getattr(model_config, "register_pre_wrap_hook", None)
    hooks = getattr(model_config, "pre_wrap_hooks", None)
    if callable(register):
        register(hook, prepend=prepend)
    elif isinstance(hooks, list):
        hooks.insert(0, hook) if prepend else hooks.append(hook)
    else:
        raise TypeError(
            f"{type(model_config).__name__} has neither register_pre_wrap_hook (a Megatron-Bridge "
            "model provider) nor a pre_wrap_hooks list (a Megatron ModelConfig, Bridge >= 0.5); "
            "pass cfg.model of a Bridge ConfigContainer, or the provider from "
            "AutoBridge.to_megatron_provider()")
    return hook


def _refuse_built(obj: Any) -> None:
    built = obj if isinstance(obj, nn.Module) else None
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(m, nn.Module) for m in obj):
        built = obj[0]
    if built is not None:
        raise TypeError(
            f"attach() got a built model ({type(unwrap(built)).__name__}), not a model config: "
            "the hook must be attached before the model is built; pass the provider (or "
            "cfg.model) and build afterwards, or quantize a built model with "
            "megaquant.integrations.nemo.quantize_for_training")


def _chunks(model: Any) -> list[nn.Module]:
    """The chunks of a pre-wrap hook's argument; wrapped or already quantized ones are refused."""
    from megaquant.nn.base import QuantModuleMixin

    if not isinstance(model, list) or not all(isinstance(m, nn.Module) for m in model):
        raise TypeError(f"a pre-wrap hook receives a list of model chunks, got "
                        f"{type(model).__name__}")
    for i, chunk in enumerate(model):
        if unwrap(chunk) is not chunk:
            raise RuntimeError(
                f"model chunk {i} is already wrapped ({type(chunk).__name__}): the megaquant "
                "pre-wrap hook ran after wrapping, i.e. it was attached after the model was "
                "built; attach it before provide_distributed_model, or use the NeMo "
                "quantize_for_training / QuantizeTransform (megaquant.integrations.nemo) for "
                "wrapped models")
        if any(isinstance(m, QuantModuleMixin) for m in chunk.modules()):
            raise RuntimeError(
                f"model chunk {i} is already quantized: the megaquant hook was registered twice "
                "or the chunk was converted before; register one megaquant hook per provider")
    return model


def convert_chunk(chunk: nn.Module, recipe: dict):
    """Convert + configure one chunk, amax left empty (nothing calibrated, nothing to load)."""
    from megaquant.convert import apply_recipe, convert_model
    from megaquant.recipe import load_recipe

    rec = load_recipe(recipe)
    report = convert_model(chunk, rec)
    apply_recipe(chunk, rec, report)
    return report


def calibrate_chunks(chunks: list[nn.Module], recipe: dict, forward_loop, dp_group) -> list:
    """Run the recipe's calibration (algorithm, then max) on converted chunks, weights in place.

    The same steps, in the same order, as :func:`megaquant.quantize` after its conversion.
    """
    from megaquant.calib.algorithms import apply_pins, run_algorithm
    from megaquant.calib.calibrate import calibrate
    from megaquant.recipe import load_recipe

    chunks = [unwrap(c) for c in chunks]
    if len(chunks) != 1:
        raise ValueError(f"calibration needs the whole model in one chunk, got {len(chunks)} "
                         "(virtual pipeline stages): calibrate with virtual_pipeline_model_"
                         "parallel_size=None and restore with init_from")
    algo = load_recipe(recipe).calib
    pins = run_algorithm(chunks[0], algo, forward_loop, dp_group)
    report = calibrate(chunks[0], forward_loop, dp_group=dp_group)
    apply_pins(pins)
    return [report]


@dataclass(frozen=True)
class _Source:
    directory: Path
    writer: str  # "megaquant" (load it here) or "megatron-bridge" (Bridge loads it)


def _check_source(directory: Path, recipe: dict) -> _Source:
    """The PTQ checkpoint at ``directory``, refused (naming both recipes) if made otherwise."""
    from megaquant.megatron.checkpoint import read_metadata
    from megaquant.train.state import check_compatible

    check_compatible(directory, recipe, kind="ptq")
    writer = read_metadata(directory).get("writer", "megaquant")
    return _Source(Path(directory), writer)


def _restore_into(chunks: list[nn.Module], source: _Source) -> None:
    from megaquant.calib.calibrate import prime_amax
    from megaquant.megatron.checkpoint import load_checkpoint

    for chunk in chunks:
        prime_amax(chunk)
    if source.writer == BRIDGE_WRITER:
        return  # Bridge's checkpoint load fills the primed amax buffers
    if len(chunks) != 1:
        raise ValueError(f"{source.directory} is a megaquant checkpoint of one model; "
                         f"got {len(chunks)} chunks (virtual pipeline stages)")
    load_checkpoint(chunks[0], source.directory)


def write_recipe_record(directory: str | Path, recipe: dict, *, rank0: bool = True) -> Path:
    """Write ``megaquant.json`` (recipe, kind ``ptq``, writer Bridge) beside a Bridge checkpoint."""
    import megaquant
    from megaquant.megatron.checkpoint import METADATA_FILE

    path = Path(directory) / METADATA_FILE
    if rank0:
        record = {"megaquant_version": megaquant.__version__, "writer": BRIDGE_WRITER,
                  "metadata": {"kind": "ptq", "recipe_config": recipe}}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        tmp.replace(path)
        if manifest.read_manifest(directory) is not None:
            # a megaquant save left a manifest: the record just replaced a listed file
            manifest.write_manifest(directory)
    return path
