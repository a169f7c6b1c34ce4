"""Random MoE weights that are the same model at every expert-parallel layout.

``model.source=random`` builds with Megatron's own CPU initialisation. For a dense model that is
layout-independent (each TP rank slices one full master weight), but not for MoE: each EP rank
creates only its local experts, so the experts draw from the RNG stream differently (at EP=2 both
ranks' experts even start identical), and everything initialised after them shifts too. A
``tiny_moe`` run at EP=1 and one at EP=2 were different models (unquantized perplexity 257.8 vs
259.5), so layouts could not be compared.

Here the whole model is drawn once, in Hugging Face names, from a generator seeded with
``run.seed`` (every rank draws the same tensors), then loaded like HF weights: TP-sharded by
``hf_to_megatron`` and cut to this rank's experts by ``local_experts``. Initialisation follows
Megatron's: normal(0, ``init_method_std``) for linears and embeddings, the output projections of
each block (``o_proj``, ``down_proj``) scaled by 1/sqrt(2 * num_layers), norms at one.
"""

from __future__ import annotations

import math
import re

import torch

_LOCAL = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")


def random_moe_hf_state(arch, seed: int) -> dict[str, torch.Tensor]:
    """The full model (every expert) in HF names, drawn deterministically from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    std = float(arch.init_method_std)
    out_std = std / math.sqrt(2.0 * arch.num_layers)
    hidden, heads = arch.hidden_size, arch.num_attention_heads
    head_dim = hidden // heads
    kv = (arch.num_query_groups or heads) * head_dim
    state: dict[str, torch.Tensor] = {}

    def normal(name, shape, s=std):
        state[name] = torch.randn(shape, generator=g) * s

    def mlp(prefix, ffn):
        normal(prefix + "gate_proj.weight", (ffn, hidden))
        normal(prefix + "up_proj.weight", (ffn, hidden))
        normal(prefix + "down_proj.weight", (hidden, ffn), out_std)

    normal("model.embed_tokens.weight", (arch.vocab_size, hidden))
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        normal(p + "self_attn.q_proj.weight", (heads * head_dim, hidden))
        normal(p + "self_attn.k_proj.weight", (kv, hidden))
        normal(p + "self_attn.v_proj.weight", (kv, hidden))
        normal(p + "self_attn.o_proj.weight", (hidden, heads * head_dim), out_std)
        state[p + "input_layernorm.weight"] = torch.ones(hidden)
        state[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        normal(p + "mlp.gate.weight", (arch.num_moe_experts, hidden))
        for e in range(arch.num_moe_experts):
            mlp(f"{p}mlp.experts.{e}.", arch.moe_ffn_hidden_size or arch.ffn_hidden_size)
        if arch.moe_shared_expert_intermediate_size:
            mlp(p + "mlp.shared_expert.", arch.moe_shared_expert_intermediate_size)
    state["model.norm.weight"] = torch.ones(hidden)
    if not arch.tie_embeddings:
        normal("lm_head.weight", (arch.vocab_size, hidden))
    return state


def local_experts(state: dict, ep_rank: int, ep: int, num_experts: int) -> dict:
    """Keep this EP rank's experts of an EP=1 Megatron state, renamed to local indices."""
    if ep == 1:
        return state
    per_rank = num_experts // ep
    first = ep_rank * per_rank
    out = {}
    for name, value in state.items():
        m = _LOCAL.search(name)
        if m is None:
            out[name] = value
        elif first <= int(m.group(2)) < first + per_rank:
            out[_LOCAL.sub(lambda m: f"{m.group(1)}{int(m.group(2)) - first}{m.group(3)}",
                           name)] = value
    return out
