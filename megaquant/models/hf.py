"""Read a local Hugging Face LLaMA-family checkpoint directory (no hub access).

A directory saved with ``model.save_pretrained(dir)`` holds ``config.json`` and either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json`` (its ``weight_map``
maps each tensor name to its shard file). We read the tensors with ``safetensors`` and translate
``config.json`` into the GPTConfig field names used across megaquant.

Supported: dense decoder-only models whose HF state dict follows LLaMA naming and math (RMSNorm,
rotate-half RoPE over the whole head, SwiGLU, no biases): ``LlamaForCausalLM``,
``MistralForCausalLM`` (no sliding window). Anything else is refused with a clear message rather
than silently loaded into the wrong math.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face model directory "
                                "(config.json + *.safetensors), e.g. from model.save_pretrained(dir)")
    return json.loads(path.read_text())


def _check_supported(hf: dict) -> None:
    archs = hf.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"architecture {archs or hf.get('model_type')} is not supported; "
                         f"megaquant reads {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
    unsupported = {
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "rope_scaling": hf.get("rope_scaling") not in (None, {}),
        "sliding_window": hf.get("sliding_window") not in (None, 0),
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"config.json sets {bad}, which megaquant's LLaMA mapping does not model; "
                         "only plain LLaMA (no biases, unscaled RoPE, full attention, SiLU) is supported")


def llama_config_from_hf(hf: dict) -> dict:
    """GPTConfig field names from a Hugging Face ``config.json`` dict (after support checks)."""
    _check_supported(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ValueError(f"head_dim={head_dim} x heads={heads} != hidden_size={hf['hidden_size']} "
                         "is not supported")
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "vocab_size": hf["vocab_size"],
        "seq_length": hf.get("max_position_embeddings", 2048),
        "rotary_base": float(hf.get("rope_theta", 10000.0)),
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors in {directory}{hint}")
    return files


def read_hf_llama(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """(config dict with GPTConfig field names, HF-named state dict in ``dtype``).

    A tied checkpoint may still carry ``lm_head.weight``; it is dropped so that "tied" always means
    "no lm_head.weight in the state dict", as for :func:`megaquant.demo.gguf.read_gguf`.
    """
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    cfg = llama_config_from_hf(_read_config(directory))
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(directory):
        for name, t in load_file(str(f)).items():
            if name.endswith("rotary_emb.inv_freq"):  # a recomputable buffer some versions saved
                continue
            state[name] = t.to(dtype)
    if cfg["tie_embeddings"]:
        state.pop("lm_head.weight", None)
    if "model.embed_tokens.weight" not in state:
        raise ValueError(f"{directory} has no model.embed_tokens.weight: not a LLaMA-named checkpoint")
    return cfg, state
