"""Hugging Face LLaMA weights <-> Megatron-Core GPTModel weights, one tensor-parallel rank at a time.

Names are those of ``GPTModel`` built with ``get_gpt_layer_local_spec()`` (megatron-core 0.16.1):

==========================================  ===================================================
Megatron (per TP rank)                      Hugging Face                    (TP split)
==========================================  ===================================================
embedding.word_embeddings.weight            model.embed_tokens.weight       rows (vocab)
decoder.layers.N.input_layernorm.weight     ...N.input_layernorm.weight     replicated
decoder.layers.N.self_attention.linear_qkv  ...N.self_attn.{q,k,v}_proj     KV groups (rows)
decoder.layers.N.self_attention.linear_proj ...N.self_attn.o_proj           columns (input)
decoder.layers.N.pre_mlp_layernorm.weight   ...N.post_attention_layernorm   replicated
decoder.layers.N.mlp.linear_fc1.weight      ...N.mlp.{gate,up}_proj         rows of each half
decoder.layers.N.mlp.linear_fc2.weight      ...N.mlp.down_proj              columns (input)
decoder.final_layernorm.weight              model.norm.weight               replicated
output_layer.weight (untied only)           lm_head.weight                  rows (vocab)
==========================================  ===================================================

MoE layers (``num_moe_experts`` set; Qwen2-MoE names, see docs/export.md), expert parallel = 1
(every expert present, local index = global index E)::

    decoder.layers.N.mlp.router.weight                          ...N.mlp.gate.weight  replicated
    decoder.layers.N.mlp.experts.local_experts.E.linear_fc{1,2} ...N.mlp.experts.E.{gate,up,down}_proj
    decoder.layers.N.mlp.shared_experts.linear_fc{1,2}          ...N.mlp.shared_expert.{gate,up,down}_proj
    decoder.layers.N.mlp.shared_experts.gate_weight (if gated)  ...N.mlp.shared_expert_gate.weight

Expert (and shared-expert) linears split over (expert-)TP exactly like the dense MLP: fc1 holds
``[gate rows of rank r; up rows of rank r]``, fc2 is split along its input columns.

Fused QKV layout (why it is not simply [Q; K; V]): Megatron computes one matmul and then views the
output as [num_query_groups, (heads_per_group + 2) * head_dim], splitting each group's slice into
its query heads, then one K head, then one V head. So the rows are, per KV group g::

    q heads g*hpg .. (g+1)*hpg - 1  (hpg*head_dim rows), k head g (head_dim rows), v head g

Tensor parallelism splits whole groups: rank r holds groups r*G/tp .. (r+1)*G/tp - 1, whose query
heads are exactly the heads whose ``o_proj`` input columns rank r holds in ``linear_proj``.

SwiGLU fc1: Megatron splits each rank's fc1 output in two halves (gate, up), so each rank holds
``[gate rows of rank r; up rows of rank r]``, not a slice of ``[gate; up]``.

Vocab padding: Megatron may pad the vocabulary (``padded_vocab_size``) so that it divides by TP;
padded rows are zero and are dropped again by :func:`megatron_to_hf`. Both functions are pure:
tensors in, tensors out; no process groups.
"""

from __future__ import annotations

import torch

_LAYER = "decoder.layers.{n}."
_HF_LAYER = "model.layers.{n}."


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _dims(cfg) -> dict:
    """The numbers the mapping needs, read from a GPTConfig-like object or dict."""
    heads = _get(cfg, "num_attention_heads")
    groups = _get(cfg, "num_query_groups") or heads
    hidden = _get(cfg, "hidden_size")
    head_dim = _get(cfg, "kv_channels") or hidden // heads
    if heads % groups:
        raise ValueError(f"num_attention_heads={heads} must be a multiple of num_query_groups={groups}")
    return {"layers": _get(cfg, "num_layers"), "heads": heads, "groups": groups, "head_dim": head_dim,
            "ffn": _get(cfg, "ffn_hidden_size"), "vocab": _get(cfg, "vocab_size"),
            "tied": bool(_get(cfg, "tie_embeddings", True)),
            "experts": _get(cfg, "num_moe_experts"),
            "shared_expert": _get(cfg, "moe_shared_expert_intermediate_size") is not None}


def _check_tp(d: dict, tp_size: int, vocab_rows: int) -> None:
    if d["groups"] % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide num_query_groups={d['groups']} "
                         "(Megatron shards whole KV groups); pick a divisor of it")
    if d["ffn"] % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide ffn_hidden_size={d['ffn']}")
    if vocab_rows % tp_size:
        raise ValueError(f"vocabulary of {vocab_rows} rows does not divide by TP={tp_size}; pass "
                         "padded_vocab_size (a multiple of TP, as Megatron pads it)")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[heads*d, h], [groups*d, h], [groups*d, h] -> Megatron's fused [(heads + 2*groups)*d, h]."""
    h = q.shape[1]
    per = (q.view(groups, -1, h), k.view(groups, -1, h), v.view(groups, -1, h))
    return torch.cat(per, dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv` (for ``groups`` KV groups held in ``qkv``)."""
    h = qkv.shape[1]
    per_group = qkv.view(groups, -1, h)
    q_rows = per_group.shape[1] - 2 * head_dim
    q, k, v = per_group.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if rows == w.shape[0]:
        return w
    assert rows > w.shape[0], (rows, w.shape)
    return torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])


def _shard(w: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return w.chunk(size, dim=dim)[rank].clone()


def _layer_to_megatron(hf: dict, n: int, d: dict, rank: int, size: int) -> dict:
    src, dst = _HF_LAYER.format(n=n), _LAYER.format(n=n)
    qkv = fuse_qkv(hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
                   hf[src + "self_attn.v_proj.weight"], d["groups"])
    out = {
        dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"].clone(),
        dst + "self_attention.linear_qkv.weight": _shard(qkv, 0, rank, size),
        dst + "self_attention.linear_proj.weight": _shard(hf[src + "self_attn.o_proj.weight"], 1, rank, size),
        dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"].clone(),
    }
    if d["experts"]:
        return {**out, **_moe_to_megatron(hf, src + "mlp.", dst + "mlp.", d, rank, size)}
    gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
    return {
        **out,
        dst + "mlp.linear_fc1.weight": torch.cat([_shard(gate, 0, rank, size), _shard(up, 0, rank, size)]),
        dst + "mlp.linear_fc2.weight": _shard(hf[src + "mlp.down_proj.weight"], 1, rank, size),
    }


def _swiglu_to_megatron(hf: dict, src: str, dst: str, rank: int, size: int) -> dict:
    """One HF SwiGLU MLP (``src`` + gate/up/down_proj) -> Megatron fc1/fc2 (``dst``) of one TP rank."""
    gate, up = hf[src + "gate_proj.weight"], hf[src + "up_proj.weight"]
    return {dst + "linear_fc1.weight": torch.cat([_shard(gate, 0, rank, size), _shard(up, 0, rank, size)]),
            dst + "linear_fc2.weight": _shard(hf[src + "down_proj.weight"], 1, rank, size)}


def _moe_to_megatron(hf: dict, src: str, dst: str, d: dict, rank: int, size: int) -> dict:
    """An MoE MLP of one TP rank at expert parallel 1: router, every expert, the shared expert."""
    out = {dst + "router.weight": hf[src + "gate.weight"].clone()}
    for e in range(d["experts"]):
        out.update(_swiglu_to_megatron(hf, f"{src}experts.{e}.", f"{dst}experts.local_experts.{e}.",
                                       rank, size))
    if d["shared_expert"]:
        out.update(_swiglu_to_megatron(hf, src + "shared_expert.", dst + "shared_experts.", rank, size))
        if src + "shared_expert_gate.weight" in hf:
            out[dst + "shared_experts.gate_weight"] = hf[src + "shared_expert_gate.weight"].clone()
    return out


def hf_to_megatron(hf_state: dict, cfg, tp_rank: int, tp_size: int, *,
                   padded_vocab_size: int | None = None) -> dict:
    """The Megatron-Core GPTModel (local spec) state dict of TP rank ``tp_rank`` of ``tp_size``.

    ``cfg`` is a GPTConfig or a dict with its field names (num_layers, hidden_size,
    num_attention_heads, num_query_groups, vocab_size, tie_embeddings; kv_channels optional).
    ``output_layer.weight`` is produced only when ``tie_embeddings`` is false.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, tp_size={tp_size})")
    d = _dims(cfg)
    missing = [k for k in _hf_names(d) if k not in hf_state]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    rows = padded_vocab_size or d["vocab"]
    _check_tp(d, tp_size, rows)
    out = {"embedding.word_embeddings.weight":
           _shard(_pad_rows(hf_state["model.embed_tokens.weight"], rows), 0, tp_rank, tp_size)}
    for n in range(d["layers"]):
        out.update(_layer_to_megatron(hf_state, n, d, tp_rank, tp_size))
    out["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"].clone()
    if not d["tied"]:
        out["output_layer.weight"] = _shard(_pad_rows(hf_state["lm_head.weight"], rows), 0, tp_rank, tp_size)
    return out


def _hf_names(d: dict) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if d["tied"] else ["lm_head.weight"])
    mlps = ["mlp."]
    if d["experts"]:
        mlps = [f"mlp.experts.{e}." for e in range(d["experts"])]
        mlps += ["mlp.shared_expert."] if d["shared_expert"] else []
    for n in range(d["layers"]):
        p = _HF_LAYER.format(n=n)
        names += [p + s for s in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "input_layernorm.weight", "post_attention_layernorm.weight")]
        names += [p + m + s for m in mlps for s in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")]
        names += [p + "mlp.gate.weight"] if d["experts"] else []
    return names


def _layer_to_hf(states: list[dict], n: int, d: dict) -> dict:
    src, dst = _LAYER.format(n=n), _HF_LAYER.format(n=n)
    local_groups = d["groups"] // len(states)
    qkv = [split_qkv(s[src + "self_attention.linear_qkv.weight"], local_groups, d["head_dim"])
           for s in states]
    out = {
        dst + "self_attn.q_proj.weight": torch.cat([t[0] for t in qkv]),
        dst + "self_attn.k_proj.weight": torch.cat([t[1] for t in qkv]),
        dst + "self_attn.v_proj.weight": torch.cat([t[2] for t in qkv]),
        dst + "self_attn.o_proj.weight":
            torch.cat([s[src + "self_attention.linear_proj.weight"] for s in states], 1),
        dst + "input_layernorm.weight": states[0][src + "input_layernorm.weight"].clone(),
        dst + "post_attention_layernorm.weight": states[0][src + "pre_mlp_layernorm.weight"].clone(),
    }
    if d["experts"]:
        return {**out, **_moe_to_hf(states, src + "mlp.", dst + "mlp.", d)}
    fc1 = [s[src + "mlp.linear_fc1.weight"].chunk(2, dim=0) for s in states]
    return {
        **out,
        dst + "mlp.gate_proj.weight": torch.cat([g for g, _ in fc1]),
        dst + "mlp.up_proj.weight": torch.cat([u for _, u in fc1]),
        dst + "mlp.down_proj.weight": torch.cat([s[src + "mlp.linear_fc2.weight"] for s in states], 1),
    }


def _swiglu_to_hf(states: list[dict], src: str, dst: str) -> dict:
    """Megatron fc1/fc2 (``src``) of every TP rank -> one HF SwiGLU MLP (``dst`` + gate/up/down_proj)."""
    fc1 = [s[src + "linear_fc1.weight"].chunk(2, dim=0) for s in states]
    return {dst + "gate_proj.weight": torch.cat([g for g, _ in fc1]),
            dst + "up_proj.weight": torch.cat([u for _, u in fc1]),
            dst + "down_proj.weight": torch.cat([s[src + "linear_fc2.weight"] for s in states], 1)}


def _moe_to_hf(states: list[dict], src: str, dst: str, d: dict) -> dict:
    """An MoE MLP gathered over TP (expert parallel 1: every expert in every state)."""
    missing = [e for e in range(d["experts"])
               if f"{src}experts.local_experts.{e}.linear_fc1.weight" not in states[0]]
    if missing:
        raise KeyError(f"{src}experts lacks experts {missing} of {d['experts']}: pass the states of a "
                       "model at expert parallel 1 (export_checkpoint loads any EP layout at EP=1)")
    out = {dst + "gate.weight": states[0][src + "router.weight"].clone()}
    for e in range(d["experts"]):
        out.update(_swiglu_to_hf(states, f"{src}experts.local_experts.{e}.", f"{dst}experts.{e}."))
    if d["shared_expert"]:
        out.update(_swiglu_to_hf(states, src + "shared_experts.", dst + "shared_expert."))
        gate = states[0].get(src + "shared_experts.gate_weight")
        if gate is not None:
            out[dst + "shared_expert_gate.weight"] = gate.clone()
    return out


def megatron_to_hf(per_rank_states: list[dict], cfg) -> dict:
    """Inverse of :func:`hf_to_megatron`: gather the TP ranks' state dicts (in rank order) into one
    HF-LLaMA state dict. Vocab padding rows are dropped; ``_extra_state`` entries are ignored.
    Replicated tensors (norms) are taken from rank 0.
    """
    if not per_rank_states:
        raise ValueError("per_rank_states is empty: pass one state dict per TP rank, in rank order")
    d = _dims(cfg)
    _check_tp(d, len(per_rank_states), per_rank_states[0]["embedding.word_embeddings.weight"].shape[0]
              * len(per_rank_states))
    vocab = d["vocab"]
    hf = {"model.embed_tokens.weight":
          torch.cat([s["embedding.word_embeddings.weight"] for s in per_rank_states])[:vocab].clone()}
    for n in range(d["layers"]):
        hf.update(_layer_to_hf(per_rank_states, n, d))
    hf["model.norm.weight"] = per_rank_states[0]["decoder.final_layernorm.weight"].clone()
    if not d["tied"]:
        hf["lm_head.weight"] = torch.cat([s["output_layer.weight"] for s in per_rank_states])[:vocab].clone()
    return hf
