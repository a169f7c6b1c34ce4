"""Random HF-LLaMA-named state dicts of a given architecture (for mapping and loader tests)."""

import torch


def random_hf_state(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_query_groups"] * d

    def r(*shape):
        return torch.randn(*shape, generator=g)

    s = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": r(h)}
    if not cfg["tie_embeddings"]:
        s["lm_head.weight"] = r(v, h)
    for n in range(cfg["num_layers"]):
        p = f"model.layers.{n}."
        s.update({p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.k_proj.weight": r(kv, h),
                  p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, h),
                  p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h),
                  p + "mlp.down_proj.weight": r(h, f), p + "input_layernorm.weight": r(h),
                  p + "post_attention_layernorm.weight": r(h)})
    return s
