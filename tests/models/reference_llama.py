"""An independent, pure-torch LLaMA forward pass, used as the reference in tests.

It reads the Hugging Face-named state dict directly (``model.layers.N.self_attn.q_proj.weight``,
...) and shares no code with megaquant's Megatron model, so "Megatron GPTModel logits == these
logits" is a real check of the weight mapping, the RoPE layout and the GQA grouping.

Signature::

    llama_forward(hf_state, arch, tokens, *, dtype=torch.float32) -> logits [batch, seq, vocab]

``arch`` is a dict (or an object with attributes) with the GPTConfig field names: num_layers,
hidden_size, num_attention_heads, num_query_groups, rotary_base, norm_epsilon, tie_embeddings.
``tokens`` is a LongTensor [batch, seq]. Computation runs in ``dtype`` (float64 for tight
comparisons, float32 for speed); logits are returned in that dtype.

The math (LLaMA / SmolLM2):
    h = embed[tokens]
    per layer: h += o_proj(attn(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))
               h += down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
    logits = rms(h) @ (lm_head or embed).T
RMSNorm: x / sqrt(mean(x^2) + eps) * w. RoPE rotates halves: for head dim d and position p,
frequency f_i = base^(-2i/d),
(x_i, x_{i+d/2}) -> (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin).
GQA: query head h uses KV group h // (heads / groups).
"""

from __future__ import annotations

import math

import torch


def _get(arch, key):
    return arch[key] if isinstance(arch, dict) else getattr(arch, key)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_cos_sin(seq: int, head_dim: int, base: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq, head_dim], each frequency repeated for both halves."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention(x, state, prefix, arch, cos, sin):
    b, s, hidden = x.shape
    heads, groups = _get(arch, "num_attention_heads"), _get(arch, "num_query_groups")
    d = hidden // heads
    q = (x @ state[prefix + "q_proj.weight"].T).view(b, s, heads, d).transpose(1, 2)
    k = (x @ state[prefix + "k_proj.weight"].T).view(b, s, groups, d).transpose(1, 2)
    v = (x @ state[prefix + "v_proj.weight"].T).view(b, s, groups, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # GQA: each KV group serves heads/groups consecutive query heads.
    k = k.repeat_interleave(heads // groups, dim=1)
    v = v.repeat_interleave(heads // groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, s, hidden)
    return out @ state[prefix + "o_proj.weight"].T


def _mlp(x, state, prefix):
    gate = x @ state[prefix + "gate_proj.weight"].T
    up = x @ state[prefix + "up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ state[prefix + "down_proj.weight"].T


@torch.no_grad()
def llama_forward(hf_state: dict, arch, tokens: torch.Tensor, *,
                  dtype=torch.float32) -> torch.Tensor:
    """Logits [batch, seq, vocab] of a LLaMA model given its HF-named state dict (see module
    doc)."""
    state = {k: v.to(dtype) for k, v in hf_state.items()}
    eps = _get(arch, "norm_epsilon")
    d = _get(arch, "hidden_size") // _get(arch, "num_attention_heads")
    cos, sin = rope_cos_sin(tokens.shape[1], d, _get(arch, "rotary_base"), dtype)
    h = state["model.embed_tokens.weight"][tokens]
    for n in range(_get(arch, "num_layers")):
        p = f"model.layers.{n}."
        h = h + _attention(rms_norm(h, state[p + "input_layernorm.weight"], eps), state,
                           p + "self_attn.", arch, cos, sin)
        h = h + _mlp(rms_norm(h, state[p + "post_attention_layernorm.weight"], eps), state,
                     p + "mlp.")
    h = rms_norm(h, state["model.norm.weight"], eps)
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    if _get(arch, "tie_embeddings"):
        head = state["model.embed_tokens.weight"]
    return h @ head.T


def perplexity(hf_state: dict, arch, batch: torch.Tensor, *, dtype=torch.float32) -> float:
    """exp(mean next-token cross-entropy) over ``batch`` [n, seq + 1] (inputs = [:, :-1]).

    One row at a time: a full [n, seq, 49152] logits tensor would need gigabytes.
    """
    total = 0.0
    for row in batch:
        logits = llama_forward(hf_state, arch, row[None, :-1], dtype=dtype)[0]
        total += float(torch.nn.functional.cross_entropy(logits.double(), row[1:], reduction="sum"))
    return math.exp(total / (batch.shape[0] * (batch.shape[1] - 1)))
