"""A Hugging Face ``config.json`` -> megaquant ``GPTConfig`` fields, per family, refusing what we
do not model.

Families (``architectures[0]`` -> the math it implies on top of LLaMA's RMSNorm, rotate-half
RoPE, SwiGLU, GQA):

=======================  =============  ================================================
architecture             hf_family      differences from LLaMA
=======================  =============  ================================================
LlamaForCausalLM         llama          optional ``rope_scaling`` (llama3, linear, dynamic)
MistralForCausalLM       mistral        none once ``sliding_window`` is null
Qwen2ForCausalLM         qwen2          q/k/v biases (always on)
Qwen3ForCausalLM         qwen3          per-head RMSNorm on q and k; explicit ``head_dim``
Qwen3MoeForCausalLM      qwen3_moe      qwen3 attention, routed experts (``mlp.experts``)
Qwen2MoeForCausalLM      qwen2_moe      q/k/v biases (``qkv_bias``), routed experts, a shared
                                        expert scaled by ``sigmoid(shared_expert_gate(x))``
MixtralForCausalLM       mixtral        routed experts (``block_sparse_moe.experts.E.w1/w2/w3``)
=======================  =============  ================================================

Two config dialects are read. transformers 4.x writes ``rope_theta`` and ``rope_scaling`` (type
under ``type`` or ``rope_type``); transformers 5 writes one ``rope_parameters`` dict holding
``rope_theta``, ``rope_type`` and the scaling fields. Reading only the old keys silently ran a
5.x checkpoint with theta 1e4 (reliability case c20), so both are read and a config that holds
both with different values is refused. Qwen2/Qwen3 configs set ``sliding_window`` while
``use_sliding_window`` is false: that is full attention.

Whatever changes the math and is not implemented -- sliding windows, biases we have no slot for,
partial rotary, other activations, yarn/longrope scaling, dense layers inside an MoE stack,
vision or audio towers, latent attention -- is refused with the key's name. This module only
reads dicts: it never imports transformers.
"""

from __future__ import annotations

from typing import Any

from megaquant.models.rope import ROPE_TYPES, RopeScaling

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")
# transformers' defaults when a hand-written config omits the key
_DEFAULT_THETA = {"mixtral": 1e6}
_FOREIGN_KEYS = ("vision_config", "audio_config", "text_config", "kv_lora_rank", "q_lora_rank")


def family_of(hf: dict, where: str = "config.json") -> str:
    """The ``hf_family`` of a config dict; ValueError naming the supported architectures."""
    archs = hf.get("architectures") or []
    known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
    if not known:
        raise ValueError(f"{where}: architecture {archs or hf.get('model_type')} is not supported; "
                         f"megaquant imports {', '.join(ARCHITECTURES)}")
    foreign = [k for k in _FOREIGN_KEYS if hf.get(k) is not None]
    if foreign:
        raise ValueError(f"{where} has {foreign}: multimodal towers and latent attention are not "
                         "implemented; megaquant imports text-only decoders")
    return known[0]


def rope_from_hf(hf: dict, family: str, where: str = "config.json") -> tuple[float, dict | None]:
    """(rope theta, ``RopeScaling`` dict or None) from either config dialect."""
    params = hf.get("rope_parameters")
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}: rope_parameters per layer type ({sorted(params)}) are not "
                         "implemented; megaquant runs one RoPE for every layer")
    old_theta, old_scaling = hf.get("rope_theta"), hf.get("rope_scaling")
    if params:
        theta = params.get("rope_theta", old_theta)
        if old_theta is not None and theta is not None and float(old_theta) != float(theta):
            raise ValueError(f"{where}: rope_theta={old_theta} disagrees with "
                             f"rope_parameters.rope_theta={theta}; keep one of them")
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = old_theta, dict(old_scaling or {})
    theta = float(theta if theta is not None else _DEFAULT_THETA.get(family, 1e4))
    return theta, _scaling(scaling, where)


def _scaling(raw: dict, where: str) -> dict | None:
    raw = dict(raw)
    rope_type = raw.pop("rope_type", None) or raw.pop("type", None) or "default"
    raw.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope scaling type {rope_type!r} is not implemented "
                         f"(it changes attention scaling or depends on position); megaquant "
                         f"implements {ROPE_TYPES}")
    partial = raw.pop("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0, 1):
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not implemented (RoPE over "
                         "the whole head only)")
    if rope_type == "default":
        return None
    attention_factor = raw.pop("attention_factor", None)
    if attention_factor not in (None, 1.0, 1):
        raise ValueError(f"{where}: rope attention_factor={attention_factor} is not implemented")
    keep = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    if rope_type != "llama3":
        keep = {"factor"}
    unknown = sorted(set(raw) - keep)
    if unknown:
        raise ValueError(f"{where}: rope scaling {rope_type!r} with keys {unknown} is not "
                         f"implemented; megaquant reads {sorted(keep)} for it")
    try:
        return RopeScaling.from_dict({"rope_type": rope_type, **raw}).to_dict()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _refuse(hf: dict, family: str, where: str) -> None:
    """Keys whose math is not implemented, by name."""
    bad = {}
    if hf.get("hidden_act", "silu") != "silu":
        bad["hidden_act"] = hf.get("hidden_act")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        bad["partial_rotary_factor"] = hf["partial_rotary_factor"]
    if hf.get("mlp_bias"):
        bad["mlp_bias"] = True
    if hf.get("attention_bias") and family != "qwen2":
        bad["attention_bias"] = "true (o_proj bias has no slot in megaquant's model)"
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", window not in (None, 0))
    if uses_window and window not in (None, 0):
        bad["sliding_window"] = f"{window} (use_sliding_window={hf.get('use_sliding_window')})"
    layer_types = set(hf.get("layer_types") or [])
    if layer_types - {"full_attention"}:
        bad["layer_types"] = sorted(layer_types)
    if family in MOE_FAMILIES:
        if hf.get("mlp_only_layers"):
            bad["mlp_only_layers"] = hf["mlp_only_layers"]
        if hf.get("decoder_sparse_step", 1) != 1:
            bad["decoder_sparse_step"] = hf["decoder_sparse_step"]
    if bad:
        raise ValueError(f"{where} sets {bad}: not implemented in megaquant's {family} import "
                         "(sliding-window attention, dense layers inside an MoE stack, output "
                         "biases and other activations would run with the wrong math)")


def gpt_fields_from_hf(hf: dict, where: str = "config.json") -> dict[str, Any]:
    """``GPTConfig`` field names and values for a supported HF config dict."""
    family = family_of(hf, where)
    _refuse(hf, family, where)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = rope_from_hf(hf, family, where)
    max_pos = hf.get("max_position_embeddings")
    fields = {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "vocab_size": hf["vocab_size"],
        "seq_length": max_pos or 2048,
        "max_position_embeddings": max_pos,
        "rotary_base": theta,
        "rope_scaling": scaling,
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": (family == "qwen2"
                         or (family == "qwen2_moe" and bool(hf.get("qkv_bias", True)))),
        "qk_layernorm": family in ("qwen3", "qwen3_moe"),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "hf_family": family,
    }
    if head_dim * heads != hf["hidden_size"]:
        fields["kv_channels"] = head_dim
    if family in MOE_FAMILIES:
        fields.update(_moe_fields(hf, family, where))
    return fields


def _moe_fields(hf: dict, family: str, where: str) -> dict[str, Any]:
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not experts:
        raise ValueError(f"{where}: {family} needs num_experts (or num_local_experts)")
    topk = hf.get("num_experts_per_tok", 2)
    if family == "mixtral":  # softmax over the top-k logits == renormalised top-k probabilities
        return {"num_moe_experts": experts, "moe_router_topk": topk,
                "moe_ffn_hidden_size": hf["intermediate_size"]}
    shared = hf.get("shared_expert_intermediate_size") or 0
    if shared and family != "qwen2_moe":
        raise ValueError(f"{where}: shared_expert_intermediate_size is not part of {family}")
    norm_topk = bool(hf.get("norm_topk_prob", False))
    if norm_topk and topk == 1:
        raise ValueError(f"{where}: norm_topk_prob with num_experts_per_tok=1 (a routing weight "
                         "of exactly 1) is not implemented by Megatron's router")
    fields = {"num_moe_experts": experts, "moe_router_topk": topk,
              "moe_ffn_hidden_size": hf["moe_intermediate_size"],
              # norm_topk_prob: renormalised top-k probabilities == softmax over the top-k logits
              "moe_router_pre_softmax": not norm_topk}
    if shared:  # Qwen2-MoE's shared expert is always gated
        fields.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    return fields
