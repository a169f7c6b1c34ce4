"""Hugging Face LLaMA weights <-> Megatron-Core GPTModel weights, one tensor-parallel rank at a
time.

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
...N.self_attention.linear_qkv.bias (qwen2) ...N.self_attn.{q,k,v}_proj.bias  KV groups, as weight
...N.self_attention.{q,k}_layernorm (qwen3) ...N.self_attn.{q,k}_norm.weight  replicated (per head)
==========================================  ===================================================

MoE layers (``num_moe_experts`` set; Qwen2/Qwen3-MoE names, Mixtral's in brackets: its block
is ``block_sparse_moe`` and its projections ``w1`` (gate), ``w3`` (up), ``w2`` (down)). Local
expert ``L`` of expert-parallel rank ``r`` of ``ep`` is global expert
``E = r * num_experts/ep + L``::

    decoder.layers.N.mlp.router.weight                          ...N.mlp.gate.weight  replicated
    decoder.layers.N.mlp.experts.local_experts.L.linear_fc{1,2}
        ...N.mlp.experts.E.{gate,up,down}_proj
    decoder.layers.N.mlp.shared_experts.linear_fc{1,2}
        ...N.mlp.shared_expert.{gate,up,down}_proj
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

from dataclasses import dataclass

import torch

_LAYER = "decoder.layers.{n}."
_HF_LAYER = "model.layers.{n}."


@dataclass(frozen=True)
class MoENames:
    """How a family names an MoE block: ``model.layers.N.<block>.gate`` (router) and
    ``model.layers.N.<block>.experts.E.<gate|up|down>`` (one expert's SwiGLU projections)."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


MOE_NAMES = {"mixtral": MoENames("block_sparse_moe", "w1", "w3", "w2")}


def moe_names(family) -> MoENames:
    """The MoE names of ``hf_family`` (Qwen2/Qwen3-MoE's unless the family says otherwise)."""
    return MOE_NAMES.get(family, MoENames())


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
        raise ValueError(f"num_attention_heads={heads} must be a multiple of "
                         f"num_query_groups={groups}")
    return {"layers": _get(cfg, "num_layers"), "heads": heads, "groups": groups,
            "head_dim": head_dim,
            "hidden": hidden, "ffn": _get(cfg, "ffn_hidden_size"), "vocab": _get(cfg, "vocab_size"),
            "tied": bool(_get(cfg, "tie_embeddings", True)),
            "experts": _get(cfg, "num_moe_experts"),
            "moe_ffn": _get(cfg, "moe_ffn_hidden_size") or _get(cfg, "ffn_hidden_size"),
            "shared_expert": _get(cfg, "moe_shared_expert_intermediate_size"),
            "shared_gate": bool(_get(cfg, "moe_shared_expert_gate", False)),
            "qkv_bias": bool(_get(cfg, "add_qkv_bias", False)),
            "qk_norm": bool(_get(cfg, "qk_layernorm", False)),
            "moe": moe_names(_get(cfg, "hf_family"))}


def _check_tp(d: dict, tp_size: int, vocab_rows: int) -> None:
    if d["groups"] % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide "
                         f"num_query_groups={d['groups']} "
                         "(Megatron shards whole KV groups); pick a divisor of it")
    if d["ffn"] % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} must divide ffn_hidden_size={d['ffn']}")
    if vocab_rows % tp_size:
        raise ValueError(f"vocabulary of {vocab_rows} rows does not divide by TP={tp_size}; pass "
                         "padded_vocab_size (a multiple of TP, as Megatron pads it)")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[heads*d, h], [groups*d, h], [groups*d, h] -> Megatron's fused [(heads + 2*groups)*d, h].

    1-D biases ([heads*d], ...) fuse the same way, into [(heads + 2*groups)*d].
    """
    if q.dim() == 1:
        return fuse_qkv(q[:, None], k[:, None], v[:, None], groups)[:, 0]
    h = q.shape[1]
    per = (q.view(groups, -1, h), k.view(groups, -1, h), v.view(groups, -1, h))
    return torch.cat(per, dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv` (for ``groups`` KV groups held in ``qkv``)."""
    if qkv.dim() == 1:
        return tuple(t[:, 0] for t in split_qkv(qkv[:, None], groups, head_dim))
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


def _attention_to_megatron(hf: dict, src: str, dst: str, d: dict, rank: int, size: int) -> dict:
    """One layer's attention (``src`` = ``model.layers.N.``) for TP rank ``rank`` of ``size``."""
    qkv = [hf[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
    out = {dst + "self_attention.linear_qkv.weight":
               _shard(fuse_qkv(*qkv, d["groups"]), 0, rank, size),
           dst + "self_attention.linear_proj.weight":
               _shard(hf[src + "self_attn.o_proj.weight"], 1, rank, size)}
    if d["qkv_bias"]:
        bias = fuse_qkv(*[hf[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"], d["groups"])
        out[dst + "self_attention.linear_qkv.bias"] = _shard(bias, 0, rank, size)
    if d["qk_norm"]:
        for p in "qk":
            out[f"{dst}self_attention.{p}_layernorm.weight"] = \
                hf[f"{src}self_attn.{p}_norm.weight"].clone()
    return out


def _layer_to_megatron(hf: dict, n: int, d: dict, rank: int, size: int,
                       ep: tuple[int, int]) -> dict:
    src, dst = _HF_LAYER.format(n=n), _LAYER.format(n=n)
    out = {
        dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"].clone(),
        **_attention_to_megatron(hf, src, dst, d, rank, size),
        dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"].clone(),
    }
    if d["experts"]:
        return {**out, **_moe_to_megatron(hf, src, dst + "mlp.", d, rank, size, ep)}
    return {**out, **_swiglu_to_megatron(hf, src + "mlp.", dst + "mlp.", rank, size)}


def _swiglu_to_megatron(hf: dict, src: str, dst: str, rank: int, size: int,
                        names: MoENames = MoENames()) -> dict:
    """One HF SwiGLU MLP (``src`` + gate/up/down) -> Megatron fc1/fc2 (``dst``) of one TP rank."""
    gate, up = hf[f"{src}{names.gate}.weight"], hf[f"{src}{names.up}.weight"]
    return {dst + "linear_fc1.weight": torch.cat([_shard(gate, 0, rank, size),
                                                  _shard(up, 0, rank, size)]),
            dst + "linear_fc2.weight": _shard(hf[f"{src}{names.down}.weight"], 1, rank, size)}


def _moe_to_megatron(hf: dict, layer: str, dst: str, d: dict, rank: int, size: int,
                     ep: tuple[int, int]) -> dict:
    """An MoE MLP of one (TP, EP) rank: router, this EP rank's experts, the shared expert."""
    names, (ep_rank, ep_size) = d["moe"], ep
    src = f"{layer}{names.block}."
    out = {dst + "router.weight": hf[src + "gate.weight"].clone()}
    local = d["experts"] // ep_size
    for i in range(local):
        e = ep_rank * local + i
        out.update(_swiglu_to_megatron(hf, f"{src}experts.{e}.", f"{dst}experts.local_experts.{i}.",
                                       rank, size, names))
    if d["shared_expert"]:
        out.update(_swiglu_to_megatron(hf, src + "shared_expert.", dst + "shared_experts.",
                                       rank, size))
        if src + "shared_expert_gate.weight" in hf:
            out[dst + "shared_experts.gate_weight"] = hf[src + "shared_expert_gate.weight"].clone()
    return out


def hf_to_megatron(hf_state: dict, cfg, tp_rank: int, tp_size: int, *,
                   padded_vocab_size: int | None = None, ep_rank: int = 0,
                   ep_size: int = 1) -> dict:
    """The Megatron-Core GPTModel (local spec) state dict of TP rank ``tp_rank`` of ``tp_size``
    (and, for MoE, expert-parallel rank ``ep_rank`` of ``ep_size``: its experts only).

    ``cfg`` is a GPTConfig or a dict with its field names (num_layers, hidden_size,
    num_attention_heads, num_query_groups, vocab_size, tie_embeddings; kv_channels,
    add_qkv_bias, qk_layernorm, num_moe_experts, hf_family optional).
    ``output_layer.weight`` is produced only when ``tie_embeddings`` is false.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, tp_size={tp_size})")
    d = _dims(cfg)
    if not 0 <= ep_rank < ep_size or (ep_size > 1 and (not d["experts"] or d["experts"] % ep_size)):
        raise ValueError(f"expert-parallel rank {ep_rank} of {ep_size} does not fit "
                         f"num_moe_experts={d['experts']}: EP must divide the number of experts")
    missing = [k for k in hf_names(cfg) if k not in hf_state]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    rows = padded_vocab_size or d["vocab"]
    _check_tp(d, tp_size, rows)
    out = {"embedding.word_embeddings.weight":
           _shard(_pad_rows(hf_state["model.embed_tokens.weight"], rows), 0, tp_rank, tp_size)}
    for n in range(d["layers"]):
        out.update(_layer_to_megatron(hf_state, n, d, tp_rank, tp_size, (ep_rank, ep_size)))
    out["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"].clone()
    if not d["tied"]:
        out["output_layer.weight"] = _shard(_pad_rows(hf_state["lm_head.weight"], rows), 0,
                                            tp_rank, tp_size)
    return out


def hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF checkpoint of ``cfg`` and its shape, in checkpoint order."""
    d = _dims(cfg)
    h, hd, v = d["hidden"], d["head_dim"], d["vocab"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(d["layers"]):
        p = _HF_LAYER.format(n=n)
        a = p + "self_attn."
        shapes.update({a + "q_proj.weight": (d["heads"] * hd, h),
                       a + "k_proj.weight": (d["groups"] * hd, h),
                       a + "v_proj.weight": (d["groups"] * hd, h),
                       a + "o_proj.weight": (h, d["heads"] * hd)})
        if d["qkv_bias"]:
            shapes.update({a + "q_proj.bias": (d["heads"] * hd,),
                           a + "k_proj.bias": (d["groups"] * hd,),
                           a + "v_proj.bias": (d["groups"] * hd,)})
        if d["qk_norm"]:
            shapes.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
        shapes.update({p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
        shapes.update(_mlp_shapes(p, d))
    shapes["model.norm.weight"] = (h,)
    if not d["tied"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _mlp_shapes(p: str, d: dict) -> dict:
    h = d["hidden"]
    if not d["experts"]:
        return {p + "mlp.gate_proj.weight": (d["ffn"], h), p + "mlp.up_proj.weight": (d["ffn"], h),
                p + "mlp.down_proj.weight": (h, d["ffn"])}
    names, f = d["moe"], d["moe_ffn"]
    src = f"{p}{names.block}."
    out = {src + "gate.weight": (d["experts"], h)}
    for e in range(d["experts"]):
        x = f"{src}experts.{e}."
        out.update({f"{x}{names.gate}.weight": (f, h), f"{x}{names.up}.weight": (f, h),
                    f"{x}{names.down}.weight": (h, f)})
    if d["shared_expert"]:
        s = d["shared_expert"]
        shared = src + "shared_expert."
        out.update({shared + "gate_proj.weight": (s, h), shared + "up_proj.weight": (s, h),
                    shared + "down_proj.weight": (h, s)})
        if d["shared_gate"]:
            out[src + "shared_expert_gate.weight"] = (1, h)
    return out


def hf_names(cfg) -> list[str]:
    """The tensor names an HF checkpoint of ``cfg`` must hold (shared-expert gate optional)."""
    return list(hf_shapes(cfg))


def _layer_to_hf(states: list[dict], n: int, d: dict) -> dict:
    src, dst = _LAYER.format(n=n), _HF_LAYER.format(n=n)
    local_groups = d["groups"] // len(states)
    qkv = [split_qkv(s[src + "self_attention.linear_qkv.weight"], local_groups, d["head_dim"])
           for s in states]
    a = dst + "self_attn."
    out = {
        a + "q_proj.weight": torch.cat([t[0] for t in qkv]),
        a + "k_proj.weight": torch.cat([t[1] for t in qkv]),
        a + "v_proj.weight": torch.cat([t[2] for t in qkv]),
        a + "o_proj.weight":
            torch.cat([s[src + "self_attention.linear_proj.weight"] for s in states], 1),
        dst + "input_layernorm.weight": states[0][src + "input_layernorm.weight"].clone(),
        dst + "post_attention_layernorm.weight":
            states[0][src + "pre_mlp_layernorm.weight"].clone(),
    }
    if d["qkv_bias"]:
        biases = [split_qkv(s[src + "self_attention.linear_qkv.bias"], local_groups, d["head_dim"])
                  for s in states]
        out.update({f"{a}{p}_proj.bias": torch.cat([b[i] for b in biases])
                    for i, p in enumerate("qkv")})
    if d["qk_norm"]:
        out.update({f"{a}{p}_norm.weight":
                    states[0][f"{src}self_attention.{p}_layernorm.weight"].clone()
                    for p in "qk"})
    if d["experts"]:
        return {**out, **_moe_to_hf(states, src + "mlp.", dst, d)}
    return {**out, **_swiglu_to_hf(states, src + "mlp.", dst + "mlp.")}


def _swiglu_to_hf(states: list[dict], src: str, dst: str, names: MoENames = MoENames()) -> dict:
    """Megatron fc1/fc2 (``src``) of every TP rank -> one HF SwiGLU MLP (``dst`` + gate/up/down)."""
    fc1 = [s[src + "linear_fc1.weight"].chunk(2, dim=0) for s in states]
    return {f"{dst}{names.gate}.weight": torch.cat([g for g, _ in fc1]),
            f"{dst}{names.up}.weight": torch.cat([u for _, u in fc1]),
            f"{dst}{names.down}.weight":
                torch.cat([s[src + "linear_fc2.weight"] for s in states], 1)}


def _moe_to_hf(states: list[dict], src: str, layer: str, d: dict) -> dict:
    """An MoE MLP gathered over TP (expert parallel 1: every expert in every state)."""
    missing = [e for e in range(d["experts"])
               if f"{src}experts.local_experts.{e}.linear_fc1.weight" not in states[0]]
    if missing:
        raise KeyError(f"{src}experts lacks experts {missing} of {d['experts']}: pass the states "
                       "of a "
                       "model at expert parallel 1 (export_checkpoint loads any EP layout at EP=1)")
    names = d["moe"]
    dst = f"{layer}{names.block}."
    out = {dst + "gate.weight": states[0][src + "router.weight"].clone()}
    for e in range(d["experts"]):
        out.update(_swiglu_to_hf(states, f"{src}experts.local_experts.{e}.", f"{dst}experts.{e}.",
                                 names))
    if d["shared_expert"]:
        out.update(_swiglu_to_hf(states, src + "shared_experts.", dst + "shared_expert."))
        gate = states[0].get(src + "shared_experts.gate_weight")
        if gate is not None:
            out[dst + "shared_expert_gate.weight"] = gate.clone()
    return out


def megatron_to_hf(per_rank_states: list[dict], cfg) -> dict:
    """Inverse of :func:`hf_to_megatron` at expert parallel 1: gather the TP ranks' state dicts (in
    rank order) into one HF state dict of ``cfg``'s family. Vocab padding rows are dropped;
    ``_extra_state`` entries are ignored. Replicated tensors (norms) are taken from rank 0.
    """
    if not per_rank_states:
        raise ValueError("per_rank_states is empty: pass one state dict per TP rank, in rank order")
    d = _dims(cfg)
    _check_tp(d, len(per_rank_states),
              per_rank_states[0]["embedding.word_embeddings.weight"].shape[0]
              * len(per_rank_states))
    vocab = d["vocab"]
    hf = {"model.embed_tokens.weight":
          torch.cat([s["embedding.word_embeddings.weight"] for s in per_rank_states])[:vocab]
          .clone()}
    for n in range(d["layers"]):
        hf.update(_layer_to_hf(per_rank_states, n, d))
    hf["model.norm.weight"] = per_rank_states[0]["decoder.final_layernorm.weight"].clone()
    if not d["tied"]:
        hf["lm_head.weight"] = torch.cat([s["output_layer.weight"]
                                          for s in per_rank_states])[:vocab].clone()
    return hf
