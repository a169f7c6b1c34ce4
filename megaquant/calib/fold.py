"""Folding a per-input-channel scale into the operation that produces a linear's input.

SmoothQuant and AWQ rewrite a linear ``y = x W^T`` as ``y = (x / s) (W * s)^T``: the float
output is unchanged, and the quantizers see ``x / s`` and ``W * s``. The division must cost
nothing at run time, so ``1 / s`` is folded into whatever computes ``x``:

=================  ============================  ===========================================
linear             producer of its input          where ``1 / s`` goes
=================  ============================  ===========================================
``linear_qkv``     ``input_layernorm``            the norm's weight (and bias)
``linear_fc1``     ``pre_mlp_layernorm``          the norm's weight (and bias)
``linear_fc2``     ``silu(gate) * up`` (SwiGLU)   the ``up`` rows of ``linear_fc1`` (linear in up)
``linear_proj``    attention: ``softmax(QK) V``   the ``V`` rows of ``linear_qkv`` (linear in V)
=================  ============================  ===========================================

The attention output of head ``h`` is a convex combination of the V rows of its KV group, so
channel ``(h, d)`` of ``linear_proj``'s input scales with V row ``(group(h), d)``. Under
grouped-query attention several query heads share one V: their channels must share one scale.
Algorithms therefore *tie* their per-channel statistics over the heads of a group
(:meth:`Producer.tie`) before computing ``s``; the tied ``s`` is then exactly foldable.

Megatron's fused QKV weight keeps, per KV group, ``[q rows of its heads; k rows; v rows]``
(``(heads/groups + 2) * head_dim`` rows per group), and ``linear_proj``'s input is head-major
(channel ``h * head_dim + d``). Under tensor parallelism both hold the same local heads and
groups, so every fold is local: no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Producer:
    """Where linear ``name``'s input scale is folded: ``kind`` is norm, fc1_up or qkv_v."""

    kind: str
    module: nn.Module
    heads_per_group: int = 1  # qkv_v: query heads sharing one V (GQA)
    head_dim: int = 1  # qkv_v

    def tie(self, v: torch.Tensor, how: str) -> torch.Tensor:
        """``v`` (per input channel) made equal over the heads of each KV group (qkv_v only).

        ``how``: "max" (ranges) or "mean" (average magnitudes). Works on a local slice or the
        full vector alike: both hold whole groups.
        """
        if self.kind != "qkv_v" or self.heads_per_group == 1:
            return v
        g = v.reshape(-1, self.heads_per_group, self.head_dim)
        g = g.amax(1, keepdim=True) if how == "max" else g.mean(1, keepdim=True)
        return g.expand(-1, self.heads_per_group, -1).reshape(v.shape)


def producer_of(model: nn.Module, name: str) -> Producer | None:
    """The :class:`Producer` of linear ``name``'s input; None where nothing can absorb a scale."""
    parent, _, leaf = name.rpartition(".")
    block = parent.rpartition(".")[0]
    try:
        if leaf in ("linear_qkv", "linear_fc1"):
            norm = model.get_submodule(block + (".input_layernorm" if leaf == "linear_qkv"
                                                else ".pre_mlp_layernorm"))
            ok = isinstance(getattr(norm, "weight", None), torch.Tensor)
            return Producer("norm", norm) if ok else None
        if leaf == "linear_fc2":
            fc1 = model.get_submodule(parent + ".linear_fc1")
            gated = bool(getattr(getattr(fc1, "config", None), "gated_linear_unit", False))
            return Producer("fc1_up", fc1) if gated else None
        if leaf == "linear_proj":
            qkv = model.get_submodule(parent + ".linear_qkv")
            cfg = qkv.config
            heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
            head_dim = cfg.kv_channels or cfg.hidden_size // heads
            return Producer("qkv_v", qkv, heads // groups, head_dim)
    except AttributeError:
        return None
    return None


def fold_input_scale(layer: nn.Module, producer: Producer, s: torch.Tensor) -> None:
    """Make ``layer``'s input ``x / s`` and its weight ``W * s``: the float output is unchanged.

    ``s`` is this rank's slice of the input channels (the whole vector for a column-parallel
    layer). For ``fc1_up`` the local up rows are the second half of the local fc1 rows
    (Megatron keeps ``[gate_r; up_r]`` per rank), matching this rank's fc2 input channels. For
    ``qkv_v``, ``s`` must already be tied (:meth:`Producer.tie`).
    """
    w = layer.weight.data
    w.mul_(s.to(w.dtype)[None, :])
    mod = producer.module
    bias = getattr(mod, "bias", None)
    if producer.kind == "norm":
        mod.weight.data.div_(s.to(mod.weight.dtype))
        if bias is not None:
            bias.data.div_(s.to(bias.dtype))
        return
    rows = _producer_rows(producer, mod.weight.shape[0])
    if producer.kind == "qkv_v":  # one scale per (group, d): the heads of a group must agree
        per_head = s.reshape(-1, producer.heads_per_group, producer.head_dim)
        if not torch.equal(per_head, per_head[:, :1].expand_as(per_head)):
            raise ValueError("a linear_proj input scale must be tied over the heads of each KV "
                             "group before folding into V (Producer.tie)")
        s = per_head[:, 0].reshape(-1)
    mod.weight.data[rows] /= s.to(mod.weight.dtype)[:, None]
    if bias is not None and bias.numel() == mod.weight.shape[0]:
        bias.data[rows] /= s.to(bias.dtype)


def _producer_rows(producer: Producer, n_rows: int) -> torch.Tensor:
    """Indices of the producer's output rows that feed the consumer's input channels, in order."""
    if producer.kind == "fc1_up":
        return torch.arange(n_rows // 2, n_rows)
    hpg, hd = producer.heads_per_group, producer.head_dim
    per_group = (hpg + 2) * hd
    groups = torch.arange(n_rows // per_group)
    v0 = groups * per_group + (hpg + 1) * hd  # first V row of each local group
    return (v0[:, None] + torch.arange(hd)[None, :]).reshape(-1)
