"""Tiny random Hugging Face models of every supported family, built offline with transformers.

``save_family(name, dir)`` builds ``AutoModelForCausalLM.from_config`` of a 2-layer, hidden-64
model, re-draws every parameter (transformers initialises biases to zero and norms to one, which
would hide a mapping error in either), saves it with ``save_pretrained`` and returns the model.
``dialect="4"`` rewrites config.json the way transformers 4.x wrote it (``rope_theta`` and
``rope_scaling`` instead of 5.x's ``rope_parameters``), so both readers are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
               "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 64}
FAMILIES = {
    # Llama-3.1-style scaling with non-default low/high factors (Megatron's own fixes 1 and 4)
    "llama3": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 5e5})),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # head_dim 32 != hidden / heads = 16, as in Qwen3-0.6B
    "qwen3": ("qwen3", dict(head_dim=32)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    head_dim=32)),
    "qwen3_moe_norm": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    # q/k/v biases, a gated shared expert
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48)),
}
DENSE = ("llama3", "llama_tied", "mistral", "qwen2", "qwen3")
MOE = ("qwen3_moe", "qwen3_moe_norm", "mixtral", "qwen2_moe")


def build_family(name: str, seed: int = 0):
    """A float32 transformers model of ``FAMILIES[name]`` with every parameter re-drawn."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, changes = FAMILIES[name]
    cfg = AutoConfig.for_model(model_type, **{**BASE, **changes})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in pname else 0.1 * noise)
    return model


def to_dialect4(directory: Path) -> None:
    """Rewrite config.json as transformers 4.x wrote it: rope_theta + rope_scaling."""
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None if params.get("rope_type") == "default" else params
    path.write_text(json.dumps(cfg))


def save_family(name: str, directory: Path, *, dialect: str = "5", seed: int = 0):
    """Build, save (safetensors) and return the model; ``dialect`` "4" or "5" for config.json."""
    model = build_family(name, seed)
    model.save_pretrained(directory)
    if dialect == "4":
        to_dialect4(directory)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def add_tokenizer(directory: Path) -> None:
    """A 256-token byte-level tokenizer.json (the byte alphabet, no merges) and the engine files
    a real checkpoint ships beside it (tokenizer_config.json, generation_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "{{ messages }}"}))
    (Path(directory) / "generation_config.json").write_text(json.dumps({"do_sample": False}))
