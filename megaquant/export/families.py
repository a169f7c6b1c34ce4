"""``config.json`` of an export, in the Hugging Face family the model came from.

An imported model records its family (``GPTConfig.hf_family``, set by
:mod:`megaquant.models.hf_config`); the export writes the same architecture back, so a Qwen3
checkpoint comes out as ``Qwen3ForCausalLM`` with its q/k norms, a Mixtral one as
``MixtralForCausalLM`` with ``block_sparse_moe`` experts. A model without a family (built from a
megaquant config or SmolLM2's GGUF) is written as LLaMA when dense and Qwen2-MoE when it has
experts (:mod:`megaquant.export.moe` says why).

Each family's *fixed* math is checked against the model before anything is written: a model
whose attention has q/k/v biases cannot be written as LLaMA, one with q/k norms only as a Qwen3
family, and so on. A mismatch is refused with the field that differs, never written under a
config that computes something else.

RoPE is written in the transformers 4.x form (``rope_theta``, ``rope_scaling``), which
transformers 5, vLLM, SGLang and TensorRT-LLM all read; transformers 5 converts it to
``rope_parameters`` on load.
"""

from __future__ import annotations

from megaquant.export.moe import moe_config

# family -> (architecture, q/k/v bias (None: either, stated in config.json), q/k norm, MoE)
FAMILIES = {
    "llama": ("LlamaForCausalLM", False, False, False),
    "mistral": ("MistralForCausalLM", False, False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False, False),
    "qwen3": ("Qwen3ForCausalLM", False, True, False),
    "qwen2_moe": ("Qwen2MoeForCausalLM", None, False, True),
    "qwen3_moe": ("Qwen3MoeForCausalLM", False, True, True),
    "mixtral": ("MixtralForCausalLM", False, False, True),
}


def export_family(arch) -> str:
    """The family an export of ``arch`` is written as; ValueError when its math does not fit."""
    family = getattr(arch, "hf_family", None) or ("qwen2_moe" if arch.num_moe_experts else "llama")
    if family not in FAMILIES:
        raise ValueError(f"{arch.name}: hf_family {family!r} has no exporter; "
                         f"known: {sorted(FAMILIES)}")
    if arch.normalization != "RMSNorm" or not arch.gated_linear_unit or arch.add_bias_linear:
        raise ValueError(f"{arch.name}: only LLaMA-style models (RMSNorm, SwiGLU, no linear "
                         f"biases) are exported; this one has normalization={arch.normalization}, "
                         f"gated_linear_unit={arch.gated_linear_unit}, "
                         f"add_bias_linear={arch.add_bias_linear}")
    _, bias, qk_norm, moe = FAMILIES[family]
    have = {"add_qkv_bias": bool(arch.add_qkv_bias), "qk_layernorm": bool(arch.qk_layernorm),
            "num_moe_experts": bool(arch.num_moe_experts)}
    want = {"add_qkv_bias": bias, "qk_layernorm": qk_norm, "num_moe_experts": moe}
    differ = {k: have[k] for k in want if want[k] is not None and have[k] != want[k]}
    if differ:
        fits = [f for f, (_, b, q, m) in FAMILIES.items()
                if b in (None, have["add_qkv_bias"])
                and (q, m) == (have["qk_layernorm"], have["num_moe_experts"])]
        raise ValueError(f"{arch.name}: {differ} does not fit the {family} family it would be "
                         f"exported as; families that fit: {fits or 'none'} (set hf_family)")
    return family


def _rope(arch) -> dict:
    scaling = dict(arch.rope_scaling) if arch.rope_scaling else None
    return {"rope_theta": float(arch.rotary_base), "rope_scaling": scaling}


def _family_fields(family: str, arch) -> dict:
    window = {"use_sliding_window": False, "sliding_window": None,
              "max_window_layers": arch.num_layers}
    topk = {"num_experts_per_tok": arch.moe_router_topk}
    expert_ffn = arch.moe_ffn_hidden_size or arch.ffn_hidden_size
    if family in ("llama", "mistral"):
        return ({"attention_bias": False, "mlp_bias": False} if family == "llama"
                else {"sliding_window": None})
    if family == "qwen2":
        return window
    if family == "qwen3":
        return {"attention_bias": False, **window}
    if family == "qwen3_moe":
        return {"attention_bias": False, **window, "num_experts": arch.num_moe_experts, **topk,
                "moe_intermediate_size": expert_ffn,
                "norm_topk_prob": not arch.moe_router_pre_softmax,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False,
                "router_aux_loss_coef": 0.0}
    if family == "mixtral":
        if arch.moe_router_pre_softmax or arch.moe_shared_expert_intermediate_size:
            raise ValueError(f"{arch.name}: Mixtral routes by softmax over the top-k logits "
                             "without shared experts; this model has moe_router_pre_softmax="
                             f"{arch.moe_router_pre_softmax}, shared experts "
                             f"{arch.moe_shared_expert_intermediate_size}")
        return {"num_local_experts": arch.num_moe_experts, **topk, "intermediate_size": expert_ffn,
                "sliding_window": None, "router_jitter_noise": 0.0, "output_router_logits": False,
                "router_aux_loss_coef": 0.0}
    cfg = moe_config(arch)
    if arch.moe_router_pre_softmax:
        cfg["norm_topk_prob"] = False
    return cfg


def hf_config(arch, *, torch_dtype: str, tokenizer=None) -> dict:
    """The ``config.json`` (without ``quantization_config``) of an export of ``arch``."""
    family = export_family(arch)
    cfg = {"architectures": [FAMILIES[family][0]], "model_type": family,
           "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size,
           "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_attention_heads,
           "num_key_value_heads": arch.num_query_groups, "head_dim": arch.head_dim,
           "vocab_size": arch.vocab_size,
           "max_position_embeddings": arch.max_position_embeddings or arch.seq_length,
           **_rope(arch), "rms_norm_eps": float(arch.norm_epsilon), "hidden_act": "silu",
           "tie_word_embeddings": bool(arch.tie_embeddings), "torch_dtype": torch_dtype,
           "attention_dropout": 0.0}
    cfg.update(_family_fields(family, arch))
    for key in ("bos_id", "eos_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            cfg[key.replace("_id", "_token_id")] = int(value)
    return cfg
