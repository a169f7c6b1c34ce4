"""Which Hugging Face modules a quantized Megatron layer becomes, and how its rows split.

The exporter quantizes *after* un-fusing, on the Hugging Face tensors, so every per-channel or
per-block scale follows the rows of the tensor a serving engine loads. This is exact:

* a fused QKV weight's rows map one to one onto q/k/v rows
  (:func:`megaquant.models.mapping.split_qkv`),
  and SwiGLU's fc1 rows are ``[gate; up]``: splitting rows moves whole rows;
* block scales (NVFP4 16, INT4 128) run along the input (last) dimension, which is never split;
* per-channel scales (axis 0) are split with the same row map as the weight (:func:`split_rows`);
* a per-tensor scale (FP8 weight scale, NVFP4 global scale, every activation scale) is *shared*
  by q/k/v (and by gate/up): each HF module gets the fused layer's scale. Serving engines fuse
  q/k/v (gate/up) again at load time and expect equal scales there (vLLM and TensorRT-LLM take
  the max of the parts when they differ, which for us is a no-op).

MoE layers use the names of the model's family (``arch.hf_family``; Qwen2-MoE's when it has
none, docs/export.md says why): a routed expert
``decoder.layers.N.mlp.experts.local_experts.E.linear_fc1`` becomes
``model.layers.N.mlp.experts.E.{gate,up}_proj`` (Qwen2/Qwen3-MoE) or
``model.layers.N.block_sparse_moe.experts.E.{w1,w3}`` (Mixtral), the shared expert
``model.layers.N.mlp.shared_expert.*``, the (never quantized) router ``model.layers.N.<block>.gate``
(:class:`megaquant.models.mapping.MoENames`).
E is the *global* expert index: the model the exporter reads is built at expert parallel 1
(``export_checkpoint`` loads any EP layout so), where local and global indices coincide; a model
still split over EP ranks is refused (:mod:`megaquant.export.moe`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from megaquant.models.mapping import MoENames, _dims, moe_names, split_qkv


@dataclass(frozen=True)
class HFTarget:
    """One Megatron layer pattern -> HF module names and the row splitter for its tensors."""

    pattern: str  # regex over the Megatron module name
    hf_names: tuple[str, ...]  # format strings, filled with the pattern's named groups
    split: str  # "qkv" | "halves" | "none"


LAYER_MAP: tuple[HFTarget, ...] = (
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.self_attention\.linear_qkv",
             ("model.layers.{n}.self_attn.q_proj", "model.layers.{n}.self_attn.k_proj",
              "model.layers.{n}.self_attn.v_proj"), "qkv"),
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.self_attention\.linear_proj",
             ("model.layers.{n}.self_attn.o_proj",), "none"),
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.mlp\.linear_fc1",
             ("model.layers.{n}.mlp.gate_proj", "model.layers.{n}.mlp.up_proj"), "halves"),
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.mlp\.linear_fc2",
             ("model.layers.{n}.mlp.down_proj",), "none"),
    # routed experts (EP): E is the global expert index; block and projection names
    # come from the family (MoENames)
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.mlp\.experts\.local_experts\.(?P<e>\d+)\.linear_fc1",
             ("model.layers.{n}.{block}.experts.{e}.{gate}",
              "model.layers.{n}.{block}.experts.{e}.{up}"),
             "halves"),
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.mlp\.experts\.local_experts\.(?P<e>\d+)\.linear_fc2",
             ("model.layers.{n}.{block}.experts.{e}.{down}",), "none"),
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.mlp\.shared_experts\.linear_fc1",
             ("model.layers.{n}.mlp.shared_expert.gate_proj",
              "model.layers.{n}.mlp.shared_expert.up_proj"),
             "halves"),
    HFTarget(r"decoder\.layers\.(?P<n>\d+)\.mlp\.shared_experts\.linear_fc2",
             ("model.layers.{n}.mlp.shared_expert.down_proj",), "none"),
    HFTarget(r"output_layer", ("lm_head",), "none"),
)
ROUTER = "model.layers.{n}.{block}.gate"  # HF name of a layer's router (kept in source precision)
EXPERT = "model.layers.{n}.{block}.experts.{e}."  # prefix of routed expert e's projections


def _names(arch) -> MoENames:
    return moe_names(getattr(arch, "hf_family", None))


def router_names(arch) -> list[str]:
    """HF module names of the routers of an MoE ``arch`` (none for a dense model)."""
    block = _names(arch).block
    return ([ROUTER.format(n=n, block=block) for n in range(arch.num_layers)]
            if arch.num_moe_experts else [])


def expert_prefix(arch, n, e) -> str:
    """HF prefix of routed expert ``e`` of layer ``n`` (``n``/``e`` may be regex strings)."""
    return EXPERT.format(n=n, e=e, block=_names(arch).block)


def hf_targets(megatron_name: str, arch=None) -> tuple[tuple[str, ...], str]:
    """(HF module names, splitter) of a Megatron linear; ValueError for a layer we cannot map.

    ``arch`` (a GPTConfig) picks the family's MoE names; without it, Qwen2-MoE's.
    """
    names = vars(_names(arch))
    for t in LAYER_MAP:
        m = re.fullmatch(t.pattern, megatron_name)
        if m:
            return tuple(n.format(**m.groupdict(), **names) for n in t.hf_names), t.split
    raise ValueError(f"no Hugging Face name is known for quantized layer {megatron_name!r}; "
                     "add a row to megaquant.export.names.LAYER_MAP or exclude it in the recipe")


def row_splitter(split: str, arch) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """A function splitting a fused [rows, ...] tensor (weight or per-channel amax) into parts."""
    if split == "none":
        return lambda t: (t,)
    if split == "halves":
        return lambda t: tuple(t.chunk(2, dim=0))
    if split == "qkv":
        d = _dims(arch)
        return lambda t: split_qkv(t, d["groups"], d["head_dim"])
    raise AssertionError(split)


def split_rows(t: Tensor, split: str, arch) -> tuple[Tensor, ...]:
    """Split ``t`` ([rows, k] or a per-channel amax [rows, 1]) like the fused weight's rows.

    A scalar (per-tensor) amax is shared by every part, see the module docstring.
    """
    parts = 1 if split == "none" else (2 if split == "halves" else 3)
    if t.dim() == 0 or t.numel() == 1:
        return (t,) * parts
    return tuple(p.contiguous() for p in row_splitter(split, arch)(t))


__all__ = ["HFTarget", "LAYER_MAP", "EXPERT", "ROUTER", "expert_prefix", "hf_targets",
           "router_names", "split_rows", "row_splitter"]
