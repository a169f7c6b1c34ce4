"""Read a local Hugging Face checkpoint directory (no hub access) of a supported family.

A directory saved with ``model.save_pretrained(dir)`` holds ``config.json`` and either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json`` (its ``weight_map``
maps each tensor name to its shard file). :mod:`megaquant.models.hf_config` turns
``config.json`` into GPTConfig fields (LLaMA, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral; anything
else refused by name); here the tensors are read with ``safetensors`` and checked against the
names and shapes that config implies (:func:`megaquant.models.mapping.hf_shapes`): a missing
tensor, one of the wrong shape and one the model has no place for are each an error naming the
tensor and its file, never a silently different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megaquant.models.hf_config import ARCHITECTURES, gpt_fields_from_hf
from megaquant.models.mapping import hf_shapes

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a recomputable buffer some versions saved


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face model directory "
                                "(config.json + *.safetensors), e.g. from "
                                "model.save_pretrained(dir)")
    return json.loads(path.read_text())


def llama_config_from_hf(hf: dict) -> dict:
    """GPTConfig field names from a Hugging Face ``config.json`` dict (after support checks)."""
    return gpt_fields_from_hf(hf)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards {absent} that are not in {directory}; "
                                    "copy every shard of the checkpoint")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors in {directory}{hint}")
    return files


def _check_tensors(directory: Path, cfg: dict, where: dict[str, str]) -> None:
    """Names and shapes against the config; ``where`` maps tensor name -> file name."""
    shapes = hf_shapes(cfg)
    optional = {n for n in where if n.endswith("shared_expert_gate.weight")}
    missing = [n for n in shapes if n not in where]
    if missing:
        files = sorted(set(where.values()))
        raise ValueError(f"{directory}: the checkpoint lacks {len(missing)} tensors config.json "
                         f"implies, e.g. {missing[:3]} (read {files}); a shard is missing or the "
                         "config does not describe these weights")
    extra = sorted(set(where) - set(shapes) - optional)
    if extra:
        raise ValueError(f"{directory}: tensors {extra[:3]} (in {where[extra[0]]}) have no place "
                         f"in the {cfg['hf_family']} model config.json describes; megaquant will "
                         "not drop weights silently (an unsupported feature such as biases or a "
                         "tower?)")


def read_hf_model(directory: str | Path, *,
                  dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """(config dict with GPTConfig field names, HF-named state dict in ``dtype``).

    A tied checkpoint may still carry ``lm_head.weight``; it is dropped so that "tied" always means
    "no lm_head.weight in the state dict", as for :func:`megaquant.demo.gguf.read_gguf`.
    """
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    cfg = gpt_fields_from_hf(_read_config(directory), where=str(directory / "config.json"))
    shapes = hf_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in _weight_files(directory):
        for name, t in load_file(str(f)).items():
            if name.endswith(_IGNORED_SUFFIXES) or (cfg["tie_embeddings"]
                                                    and name == "lm_head.weight"):
                continue
            if name in shapes and tuple(t.shape) != shapes[name]:
                raise ValueError(f"{f}: tensor {name} has shape {tuple(t.shape)}, but config.json "
                                 f"implies {shapes[name]}; the config and the weights disagree")
            state[name], where[name] = t.to(dtype), f.name
    _check_tensors(directory, cfg, where)
    return cfg, state


read_hf_llama = read_hf_model  # the name before Qwen and MoE families were read
