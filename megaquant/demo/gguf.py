"""Read a LLaMA-architecture GGUF file (llama.cpp's format) into a Hugging Face-named state dict.

GGUF stores metadata (architecture numbers, the tokenizer) as typed key/value fields, and tensors
under llama.cpp names (``blk.N.attn_q.weight``), often block-quantized (Q4_1, Q8_0, ...). We read
it with the ``gguf`` package and dequantize every tensor to float32.

The one subtle step: llama.cpp's converter permutes the rows of the Q and K projections so that its
RoPE kernel can rotate *adjacent* pairs (x[2i], x[2i+1]); Hugging Face and Megatron rotate *halves*
(x[i], x[i + d/2]). Per head of dimension d, llama.cpp's row ``2i + j`` (j in {0, 1}) is HF's row
``j*d/2 + i``. We undo it with :func:`unpermute_rope_rows`. Skip it and the model still runs but is
much worse: on SmolLM2-135M, perplexity on Hamlet goes from about 42 to about 230 (tests check it).

Caveat on quantization studies: the weights of SmolLM2-135M-Instruct that megaquant ships by
default come from a Q4_1 GGUF (4-bit blocks of 32 with a scale and a minimum; the embedding is
Q8_0). Dequantized, the linear weights lie on a 4-bit grid already, so the *weight*-quantization
error measured on this model (e.g. INT4 or NVFP4 weights) is understated compared with the
original bf16 checkpoint. Activations are not affected.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

# llama.cpp tensor name -> Hugging Face LLaMA name; {n} is the layer index.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: interleaved RoPE pairs -> rotate-half layout.

    ``w`` is [n_heads * head_dim, in_features]. llama.cpp viewed each head's rows as
    [2, head_dim/2] (HF's halves) and transposed to [head_dim/2, 2] (adjacent pairs); we view the
    stored rows as [head_dim/2, 2] and transpose back.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    assert head_dim * n_heads == rows and head_dim % 2 == 0, (w.shape, n_heads)
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`unpermute_rope_rows` (the permutation llama.cpp's converter applies)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _field_value(field):
    """A GGUF field as a plain Python value (str, int, float, bool or a list of them)."""
    return field.contents()


def read_gguf_metadata(path: str | Path) -> dict:
    """Only the metadata fields of a GGUF file (cheap compared with dequantizing the tensors)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def llama_config_from_gguf(metadata: dict) -> dict:
    """The architecture numbers of a ``general.architecture == 'llama'`` GGUF, named like
    :class:`megaquant.models.gpt.GPTConfig` fields."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' "
                         "(LLaMA, SmolLM, Mistral-style dense models) can be read")
    p = "llama."
    heads = int(metadata[p + "attention.head_count"])
    hidden = int(metadata[p + "embedding_length"])
    vocab = metadata.get(p + "vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    head_dim = int(metadata.get(p + "rope.dimension_count", hidden // heads))
    if head_dim != hidden // heads:
        raise ValueError(f"partial RoPE (rope.dimension_count={head_dim}, head dim "
                         f"{hidden // heads}) is not supported")
    return {
        "num_layers": int(metadata[p + "block_count"]),
        "hidden_size": hidden,
        "ffn_hidden_size": int(metadata[p + "feed_forward_length"]),
        "num_attention_heads": heads,
        "num_query_groups": int(metadata.get(p + "attention.head_count_kv", heads)),
        "vocab_size": int(vocab),
        "seq_length": int(metadata[p + "context_length"]),
        "max_position_embeddings": int(metadata[p + "context_length"]),
        "rotary_base": float(metadata.get(p + "rope.freq_base", 10000.0)),
        "norm_epsilon": float(metadata[p + "attention.layer_norm_rms_epsilon"]),
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "tie_embeddings": None,  # filled by read_gguf: tied iff the file has no output.weight
    }


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a LLaMA model (biases, "
                         "MoE experts and rope_freqs tensors are not supported)")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def _dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as float32 in PyTorch's [out, in] order (GGUF lists dims innermost-first)."""
    from gguf.quants import dequantize

    data = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # np.array copies: unquantized (F32) tensors come back as read-only views of the memory map.
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def read_gguf(path: str | Path, *,
              unpermute_qk: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a LLaMA GGUF: (metadata dict, HF-LLaMA-named float32 state dict).

    ``lm_head.weight`` is present only when the file has a separate output matrix (untied).
    ``unpermute_qk=False`` keeps llama.cpp's interleaved Q/K rows; it exists only so tests can
    show that the un-permutation matters.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(str(path))
    metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    cfg = llama_config_from_gguf(metadata)
    state = {_hf_name(t.name): _dequantize(t) for t in reader.tensors}
    if unpermute_qk:
        for name in list(state):
            if name.endswith("q_proj.weight"):
                state[name] = unpermute_rope_rows(state[name], cfg["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                state[name] = unpermute_rope_rows(state[name], cfg["num_query_groups"])
    return metadata, state
