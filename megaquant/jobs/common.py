"""What the PTQ (and later QAT/export) jobs share: model sources, data, rank-0 output.

A job config has ``model`` (source, path, seq_length, arch), ``parallel`` (tp, pp, ep) and ``data``
(calib_text, eval_text, calib_samples, eval_samples, micro_batch) groups; see ``configs/``.
Every check that can fail on bad input runs on every rank before any heavy work, so a typo
fails fast everywhere instead of leaving some ranks waiting in a collective.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaquant.models.gpt import GPTConfig
from megaquant.util import is_rank0, write_json_atomic  # noqa: F401  (used by the jobs)

MODEL_SOURCES = ("smollm2", "hf", "megatron", "random")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256), for randomly initialised test models."""

    vocab_size = 256
    bos_id = eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass
class LoadedModel:
    """A model source resolved to an architecture, HF-named weights (or None) and a tokenizer."""

    arch: GPTConfig
    hf_state: dict[str, torch.Tensor] | None
    tokenizer: Any
    checkpoint: Path | None = None  # a megaquant/Megatron checkpoint to load after building
    tokenizer_source: str = "bytes"  # recorded in checkpoints: "bytes" | "smollm2" | an HF dir


def tokenizer_from_source(source: str):
    """The tokenizer a checkpoint's metadata names (see LoadedModel.tokenizer_source)."""
    if source == "bytes":
        return ByteTokenizer()
    if source == "smollm2":
        from megaquant.demo.gguf import read_gguf_metadata
        from megaquant.demo.smollm2 import smollm2_gguf_path
        from megaquant.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(read_gguf_metadata(smollm2_gguf_path()))
    from megaquant.tokenizer import tokenizer_from_hf_dir

    return tokenizer_from_hf_dir(source)


def load_model_source(model_cfg: dict) -> LoadedModel:
    """Resolve ``model.source`` (see MODEL_SOURCES) without building anything yet."""
    source, seq = model_cfg.get("source"), int(model_cfg["seq_length"])
    if source not in MODEL_SOURCES:
        raise ValueError(f"unknown model.source {source!r}; valid: {MODEL_SOURCES}")
    if source == "random":
        if not model_cfg.get("arch"):
            raise ValueError("model.source=random needs model.arch (see configs/model/tiny.yaml)")
        arch = GPTConfig.from_dict({**model_cfg["arch"], "seq_length": seq, "name": "random GPT"})
        return LoadedModel(arch, None, ByteTokenizer())
    if source == "smollm2":
        from megaquant.demo.smollm2 import load_smollm2

        arch, hf_state, tok = load_smollm2()
        return LoadedModel(_arch(arch, seq, "SmolLM2-135M"), hf_state, tok, None, "smollm2")
    path = Path(model_cfg.get("path") or "")
    if not path.is_dir():
        raise ValueError(f"model.path {str(path)!r} is not a directory (model.source={source})")
    if source == "hf":
        from megaquant.models.hf import read_hf_llama
        from megaquant.tokenizer import tokenizer_from_hf_dir

        arch, hf_state = read_hf_llama(path)
        return LoadedModel(_arch(arch, seq, path.name), hf_state, tokenizer_from_hf_dir(path),
                           None, str(path.resolve()))
    from megaquant.megatron.checkpoint import read_metadata

    meta = read_metadata(path).get("metadata", {})
    if "arch" not in meta:
        raise ValueError(f"{path} records no model architecture ('arch' in megaquant.json): "
                         "only checkpoints written by megaquant jobs can be used as "
                         "model.source=megatron")
    arch = GPTConfig.from_dict({**meta["arch"], "seq_length": seq})
    source = meta.get("tokenizer", "bytes")
    return LoadedModel(arch, None, tokenizer_from_source(source), path, source)


# SmolLM2-135M's published checkpoint (config.json "torch_dtype") was trained and released in bf16
SMOLLM2_DTYPE = "bfloat16"
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def source_dtype(model_cfg: dict, arch: GPTConfig) -> str:
    """The dtype the source model was trained / published in (what ``export dtype=auto`` writes
    unquantized tensors in): an HF directory's config.json ``dtype``/``torch_dtype``, SmolLM2's
    bf16, a megaquant checkpoint's recorded ``source_dtype``, else the model's ``params_dtype``."""
    source, path = model_cfg.get("source"), Path(model_cfg.get("path") or "")
    found = None
    if source == "smollm2":
        found = SMOLLM2_DTYPE
    elif source == "hf" and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        found = cfg.get("dtype") or cfg.get("torch_dtype")
    elif source == "megatron":
        from megaquant.megatron.checkpoint import read_metadata

        found = read_metadata(path).get("metadata", {}).get("source_dtype")
    return found if found in _DTYPE_NAMES else arch.params_dtype


def _arch(arch: dict, seq: int, name: str) -> GPTConfig:
    return GPTConfig.from_dict({**arch, "seq_length": seq, "name": name})


def resolve_text(path: str | None, default: str) -> Path:
    """A configured text path (checked now), or the embedded default text."""
    if path is None:
        from megaquant import data

        return getattr(data, default)()
    p = Path(path).expanduser()
    if not p.is_file():
        key = "data.calib_text" if "calib" in default else "data.eval_text"
        raise ValueError(f"{key}={path!r}: no such file; give a UTF-8 text file or null for the "
                         "default")
    return p


def check_positive(**values: int) -> None:
    """Refuse sizes below 1 by config key: ``check_positive(**{"data.micro_batch": 0})``."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: must be a whole number >= 1; set {key} to a "
                             "positive value")


def check_data_sizes(cfg) -> None:
    """The data and sequence sizes of a PTQ/QAT config, checked by name before any work."""
    data = cfg.data
    sizes = {"model.seq_length": cfg.model.seq_length}
    for key in ("calib_samples", "eval_samples", "micro_batch", "train_samples"):
        if key in data:
            sizes[f"data.{key}"] = data[key]
    check_positive(**sizes)


def token_batches(path: Path, tokenizer, samples: int, seq_len: int, micro_batch: int,
                  offset: int = 0) -> list[torch.Tensor]:
    """[micro_batch, seq_len + 1] int64 token windows of a text (inputs plus shifted labels)."""
    from megaquant.data import token_batches as windows

    tokens = windows(path, tokenizer, samples, seq_len, offset=offset)
    return list(tokens.split(micro_batch))


# is_rank0, write_json_atomic: imported above from megaquant.util (the jobs' names for them).
