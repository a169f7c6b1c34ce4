"""Mixture-of-experts exports: the Qwen2-MoE ``config.json`` and the checks that keep it honest.

Why Qwen2-MoE (``Qwen2MoeForCausalLM``): it is the Hugging Face family whose layers are exactly
megaquant's MoE layers -- LLaMA attention (with ``qkv_bias: false``), RMSNorm, SwiGLU experts,
a softmax top-k router renormalised over the chosen experts (``norm_topk_prob: true``, which is
Megatron's default: top-k of the logits, then softmax over those k) -- and its per-expert names
(``mlp.experts.E.{gate,up,down}_proj``, router ``mlp.gate``) are the ones vLLM, SGLang,
TensorRT-LLM and transformers read for Qwen2/3-MoE, OLMoE and DeepSeek experts. This is the
default for a model without a Hugging Face family; an imported Qwen3-MoE, Mixtral or Qwen2-MoE is
written as itself (:mod:`megaquant.export.families`).

Shared experts: Qwen2-MoE has one shared expert whose output is scaled by
``sigmoid(shared_expert_gate(x))``, which is Megatron's ``moe_shared_expert_gate=True``. An
ungated shared expert (what ``GPTConfig.moe_shared_expert_intermediate_size`` builds) has no
Qwen2-MoE equivalent, so it is refused rather than written under a config that would compute
something else. Without a shared expert, ``shared_expert_intermediate_size: 0`` (vLLM and SGLang
then build none).

Experts are written under their *global* index. The exporter reads a model at expert parallel 1
(``export_checkpoint`` loads a checkpoint saved at any EP x TP layout so: Megatron's distributed
checkpoint holds every expert under its global index and gathers expert-TP shards along their
axes); a model still split over EP ranks is refused, and before writing, every layer must hold
exactly ``num_moe_experts`` experts with all three projections.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megaquant.export.names import expert_prefix, router_names
from megaquant.models.mapping import moe_names


def check_moe_model(model: torch.nn.Module, arch) -> None:
    """Refuse what a Qwen2-MoE export cannot hold: EP-split experts, ungated shared experts."""
    for name, m in model.named_modules():
        if name.endswith("mlp.experts") and not hasattr(m, "local_experts"):
            raise ValueError(f"{name} is a {type(m).__name__} (grouped expert weights), not "
                             "per-expert linears: export a model built with SequentialMLP experts "
                             "(megaquant's local spec, what export_checkpoint builds)")
        ep_group = getattr(m, "ep_group", None)
        if hasattr(m, "local_experts") and ep_group is not None and dist.is_initialized() \
                and dist.get_world_size(ep_group) > 1:
            raise ValueError(f"{name} is split over {dist.get_world_size(ep_group)} "
                             "expert-parallel "
                             "ranks: export a model built at EP=1 (export_checkpoint loads a "
                             "checkpoint saved at any EP/TP layout at EP=1, TP=1)")
        if name.endswith("shared_experts") and not getattr(m, "use_shared_expert_gate", True):
            raise ValueError(f"{name} is an ungated shared expert: Qwen2-MoE (the exported MoE "
                             "format) scales its shared expert by sigmoid(shared_expert_gate(x)), "
                             "so this model has no faithful HF config; export it without shared "
                             "experts or with Megatron's moe_shared_expert_gate=True")
        if name.endswith("mlp.router") and getattr(m, "bias", None) is not None:
            raise ValueError(f"{name} has a bias; Qwen2-MoE's router (mlp.gate) has none")


def moe_config(arch) -> dict:
    """The Qwen2-MoE fields of ``config.json`` (merged over the LLaMA ones by the caller)."""
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "num_experts": arch.num_moe_experts, "num_experts_per_tok": arch.moe_router_topk,
            "moe_intermediate_size": arch.moe_ffn_hidden_size or arch.ffn_hidden_size,
            "shared_expert_intermediate_size": arch.moe_shared_expert_intermediate_size or 0,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "qkv_bias": bool(getattr(arch, "add_qkv_bias", False)), "output_router_logits": False,
            "router_aux_loss_coef": 0.0,
            "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": arch.num_layers, "attention_dropout": 0.0}


def check_experts_complete(tensor_names, arch) -> None:
    """Every layer holds experts 0..E-1, each with gate/up/down_proj, and its router."""
    have: dict[tuple[int, int], set] = {}
    escaped = expert_prefix(arch, "{n}", "{e}").replace(".", r"\.")
    pattern = re.compile(escaped.format(n=r"(\d+)", e=r"(\d+)") + r"(\w+)\.")
    for k in tensor_names:
        m = pattern.match(k)
        if m:
            have.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    want = {(n, e) for n in range(arch.num_layers) for e in range(arch.num_moe_experts)}
    names = moe_names(getattr(arch, "hf_family", None))
    projs = {names.gate, names.up, names.down}
    bad = sorted(k for k in want if have.get(k) != projs) + sorted(set(have) - want)
    routers = [r for r in router_names(arch) if f"{r}.weight" not in tensor_names]
    if bad or routers:
        raise RuntimeError(f"refusing to write an MoE export with missing or extra experts "
                           f"(layer, expert) {bad[:6]} or routers {routers[:3]}: every layer must "
                           f"hold experts 0..{arch.num_moe_experts - 1} under their global index")
