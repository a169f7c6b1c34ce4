"""Training checkpoints: weights, quantizer state, optimizer state, RNG and the step, in one
Megatron distributed checkpoint, written atomically, loadable at another TP/DP/EP layout.

Built on :mod:`megaquant.megatron.checkpoint` (``save_checkpoint``/``load_checkpoint``), which
takes any object with ``sharded_state_dict()`` and ``load_state_dict(state, strict)``;
:class:`TrainState` is that object for a model plus its optimizer:

* model entries: the model's own ``sharded_state_dict()`` (quantizer amax included, TP-sharded
  where it is per channel);
* optimizer entries: for every param, its AdamW ``exp_avg`` / ``exp_avg_sq`` described by
  *the same* sharded description as the param (``dataclasses.replace`` of its ShardedTensor or
  SwiGLU factory with a new key and the state tensor as data), as Megatron's own optimizers do.
  So optimizer state reshards exactly like the weights: saved at TP=2, it loads at TP=1; an
  expert's moments, like its weights, are stored under the expert's global index (Megatron's
  ``SequentialMLP.sharded_state_dict``), so saved at EP=2 they load at EP=1;
* ``rng_state``: each rank's CPU/CUDA generator and RNG-tracker states, a ShardedObject per
  rank. RNG streams are per rank, so they are restored only at the layout they were saved at;
* metadata (``megaquant.json``): kind, recipe, step, layout, and the training config.

Layout on disk: ``<dir>/step_0000010/`` (one checkpoint each) and ``<dir>/latest`` (a text file
naming the newest). A save writes the step directory atomically (``save_checkpoint``), and
only then replaces ``latest`` with ``os.replace``; a crash at any point leaves ``latest``
naming a complete checkpoint. Old step directories beyond ``keep`` are deleted afterwards.
Resuming (``resume_checkpoint``) takes the newest step whose files match their SHA-256 manifest:
a damaged ``latest`` falls back to the previous kept step, with a warning naming both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megaquant.megatron.checkpoint import load_checkpoint, read_metadata, save_checkpoint

KIND = "megaquant-train-v1"
OPT_PREFIX = "optimizer."
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
LATEST = "latest"
log = logging.getLogger("megaquant.train")


class TrainState:
    """A model and its optimizer seen as one checkpointable object (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 with_rng: bool = True):
        self.model, self.optimizer, self.with_rng = model, optimizer, with_rng

    def _param_states(self) -> dict[str, dict]:
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        return {by_id[id(p)]: s for p, s in self.optimizer.state.items() if id(p) in by_id}

    def sharded_state_dict(self) -> dict:
        sharded = self.model.sharded_state_dict()
        if self.optimizer is not None:
            sharded.update(self._optimizer_entries(sharded))
        if self.with_rng:
            from megatron.core.dist_checkpointing.mapping import ShardedObject

            rank, world = dist.get_rank(), dist.get_world_size()
            sharded["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,),
                                                 replica_id=0)
        return sharded

    def _optimizer_entries(self, sharded: dict) -> dict:
        states = self._param_states()
        params = dict(self.model.named_parameters())
        out = {}
        for name, param in params.items():
            if name not in states:
                raise RuntimeError(f"optimizer holds no state for {name}: initialise it first "
                                   "(init_optimizer_state)")
            entry = sharded.get(name)
            if entry is None or getattr(entry, "data", None) is not param:
                raise RuntimeError(f"parameter {name} has no sharded description of its own; "
                                   "its optimizer state cannot be checkpointed")
            for k in ADAM_KEYS:
                out[f"{OPT_PREFIX}{k}.{name}"] = dataclasses.replace(
                    entry, key=f"{OPT_PREFIX}{k}.{entry.key}", data=states[name][k])
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        opt = {k: state.pop(k) for k in list(state) if k.startswith(OPT_PREFIX)}
        rng = state.pop("rng_state", None)
        self.model.load_state_dict(state, strict=strict)
        if opt:
            states = self._param_states()
            for key, value in opt.items():
                kind, name = key[len(OPT_PREFIX):].split(".", 1)
                states[name][kind].copy_(value)
        if rng is not None:
            set_rng_state(rng)


def init_optimizer_state(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Give every param AdamW state (zeros if new) with step count ``step``, before a load."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state[p]
            for k in ADAM_KEYS:
                if k not in s:
                    s[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["step"] = torch.tensor(float(step))


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------ directories
def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``<root>/latest`` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    target = Path(root) / pointer.read_text().strip()
    if not target.is_dir():
        raise FileNotFoundError(f"{pointer} names {target}, which does not exist; delete "
                                f"{pointer} to start over or restore the directory")
    return target


def recover_step_leftovers(root: str | Path) -> list[str]:
    """Clean what a killed save left in ``root`` (call under the output-directory lock).

    ``.step_N.partial`` was never committed: deleted. ``.step_N.old`` is the previous copy of a
    step being replaced: renamed back when ``step_N`` is missing (killed between the renames),
    else deleted. Returns one note per action, for the log.
    """
    root, notes = Path(root), []
    for partial in sorted(root.glob(".step_*.partial")):
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed {partial}, left by an interrupted save")
    for old in sorted(root.glob(".step_*.old")):
        target = root / old.name[1:-len(".old")]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            notes.append(f"removed {old}, left by a save killed after committing")
        else:
            old.rename(target)
            notes.append(f"restored {target} from {old} (a save was killed while swapping)")
    return notes


def resume_checkpoint(root: str | Path) -> Path | None:
    """The newest intact checkpoint to resume from: the one ``latest`` names, or else the newest
    kept ``step_*`` whose files match their manifest (a warning says which was skipped and why).

    None when ``root`` holds no checkpoint yet; a ValueError listing every candidate's problem
    when none is intact. Every rank gets the same answer (same files, same checks).
    """
    from megaquant import manifest

    root = Path(root)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    candidates = ([named] if named is not None else []) + [p for p in steps if p != named]
    if not candidates:
        return None
    problems = []
    for candidate in candidates:
        try:
            if not candidate.is_dir():
                raise FileNotFoundError(f"{pointer} names {candidate}, which does not exist")
            read_metadata(candidate)
            manifest.verify(candidate)
        except (OSError, ValueError) as e:
            problems.append(f"{candidate.name}: {e}")
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint; skipped: %s",
                        candidate, " | ".join(problems))
        return candidate
    raise ValueError(f"no intact checkpoint to resume from under {root}: {' | '.join(problems)}. "
                     "Restore one, or start over with trainer.resume=false (or another "
                     "run.output_dir)")


def save_train_state(model: nn.Module, optimizer, root: str | Path, *, step: int,
                     metadata: dict[str, Any], keep: int = 2) -> Path:
    """Collective: write ``<root>/step_<step>`` and point ``<root>/latest`` at it."""
    root = Path(root).absolute()
    meta = {**metadata, "kind": KIND, "step": step}
    if optimizer is not None and not optimizer.state:
        init_optimizer_state(optimizer, 0)  # zeros at step 0 are what a fresh AdamW starts from
    from megaquant.finite import check_quantized_finite

    check_quantized_finite(model, before=f"saving the train checkpoint of step {step}")
    target = save_checkpoint(TrainState(model, optimizer), step_dir(root, step), metadata=meta)
    if dist.get_rank() == 0:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(target.name + "\n")
        os.replace(tmp, root / LATEST)  # the commit point: atomic on POSIX
        olds = sorted(p for p in root.glob("step_*") if p.is_dir() and p != target)
        for old in olds[:max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return target


def describe_recipe(cfg: dict | None) -> str:
    """``'nvfp4' (weight nvfp4, input nvfp4)`` — how errors name a recipe and its formats."""
    if cfg is None:
        return "no quantization (model.quantization=null)"
    fmts = sorted({f"{role} {q['format']}" for rule in cfg.get("rules", [])
                   for role, q in rule.items() if isinstance(q, dict) and "format" in q})
    return f"{cfg.get('name', 'custom')!r} ({', '.join(fmts)})"


def check_compatible(directory: str | Path, recipe_config: dict | None, *,
                     kind: str = KIND) -> dict:
    """The checkpoint's metadata, or a ValueError naming both recipes / kinds when they differ."""
    record = read_metadata(directory)
    meta = record.get("metadata", {})
    saved_kind = meta.get("kind", "ptq")
    if saved_kind != kind:
        hint = ("; start from a PTQ output with model.init_from=DIR instead of resuming from it"
                if saved_kind == "ptq" else "")
        raise ValueError(f"{directory} is a {saved_kind!r} checkpoint but a {kind!r} checkpoint "
                         f"was expected{hint}")
    saved = meta.get("recipe_config")
    if _norm(saved) != _norm(recipe_config):
        from megaquant.recipe import canonical_recipe

        # compared in the current schema, so a version or a spelled-out default is no difference
        diff = recipe_differences(canonical_recipe(saved), canonical_recipe(recipe_config))
        raise ValueError(f"{directory} was made with recipe {describe_recipe(saved)}, but this run "
                         f"uses {describe_recipe(recipe_config)}; they differ in {diff}. Set "
                         "model.quantization (and its options) to the checkpoint's recipe or "
                         "start from another directory")
    return record


def recipe_differences(saved, current, path: str = "", limit: int = 4) -> str:
    """``rules[0].weight.block_size: 7 in the checkpoint, 16 in this run; ...`` (first few)."""
    out: list[str] = []

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, "(absent)"), b.get(k, "(absent)"), f"{where}.{k}" if where else k)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif a != b:
            out.append(f"{where or 'the recipe'}: {a!r} in the checkpoint, {b!r} in this run")

    walk(saved, current, path)
    return "; ".join(out[:limit]) + (f"; and {len(out) - limit} more" if len(out) > limit else "")


def _norm(cfg: dict | None) -> str:
    # Parsed and upgraded to the current recipe schema: a recipe saved before a schema change
    # (or spelled with its defaults left out) compares equal to the same recipe today.
    from megaquant.recipe import canonical_recipe

    return json.dumps(canonical_recipe(cfg), sort_keys=True)


def load_train_state(model: nn.Module, optimizer, directory: str | Path, *,
                     recipe_config: dict | None, layout: dict, verify: bool = True) -> dict:
    """Collective: load a train checkpoint into ``model`` (+ ``optimizer``); return its metadata.

    ``model`` must already be quantized with ``recipe_config`` (so its amax buffers exist).
    ``layout`` (``{"tp":.., "dp":.., "ep":.., "world_size":..}``, ``ep`` 1 when left out)
    decides whether the per-rank RNG streams can be restored; weights, quantizer and optimizer
    state load at any layout.
    """
    record = check_compatible(directory, recipe_config)
    meta = record["metadata"]
    saved = record["parallel"]
    same = all(saved.get(k) == v for k, v in {"ep": 1, **layout}.items())
    if optimizer is not None:
        init_optimizer_state(optimizer, meta["step"])
    load_checkpoint(TrainState(model, optimizer, with_rng=same), directory, verify=verify)
    return meta
