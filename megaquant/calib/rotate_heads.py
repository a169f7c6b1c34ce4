"""Per-head value/output rotation (QuaRot's R2): rotate each head's V and its o_proj columns.

Attention mixes the V rows of a head's KV group with softmax weights (a convex combination per
query), so any right-multiplication of V by a ``head_dim x head_dim`` matrix ``R`` passes
through it unchanged: ``softmax(QK^T) (V R) = (softmax(QK^T) V) R``. With ``R`` orthogonal

    V rows of linear_qkv:   W_v <- R^T W_v   (bias b_v <- R^T b_v)
    linear_proj, head h:    W_o[:, h] <- W_o[:, h] R

leave the float model unchanged (offline, free at run time) while ``linear_proj``'s input, the
attention output, is rotated inside every head: outlier channels of a head are spread over the
head's ``head_dim`` values, which helps per-tensor and per-block activation scales of o_proj.
``R = diag(signs) H / sqrt(head_dim)`` (a randomized Hadamard of the head size, seeded); one
``R`` for every head, so grouped-query attention needs nothing special (the query heads of a
group read the same rotated V).

Parallel rules: a rank holds whole heads and whole KV groups (qkv rows and proj columns split by
heads), so each rank rotates its own heads; ``R`` is identical on every rank (same seed).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from megaquant.calib.capture import progress
from megaquant.calib.fold import Producer, _producer_rows
from megaquant.recipe_calib import RotateHeadsOptions as Options
from megaquant.transforms.hadamard import rotation

_ATTN = re.compile(r"(^|.*\.)layers\.\d+\.self_attention$")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for n, m in model.named_modules() if _ATTN.match(n)]
    if not mods:
        raise ValueError("rotate_heads needs Megatron attention modules (self_attention with "
                         "linear_qkv and linear_proj); none found")
    return mods


def rotate_attention(attn: nn.Module, r: torch.Tensor) -> None:
    """Rotate the V rows of ``attn.linear_qkv`` and the head columns of ``attn.linear_proj``."""
    qkv, proj = attn.linear_qkv, attn.linear_proj
    cfg = qkv.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    hd = cfg.kv_channels or cfg.hidden_size // heads
    rows = _producer_rows(Producer("qkv_v", qkv, heads // groups, hd), qkv.weight.shape[0])
    w = qkv.weight.data
    v = w[rows].double().reshape(-1, hd, w.shape[1])  # [local groups, hd, hidden]
    w[rows] = torch.einsum("dk,gdh->gkh", r, v).reshape(-1, w.shape[1]).to(w.dtype)
    bias = getattr(qkv, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() == w.shape[0]:
        bias.data[rows] = (bias.data[rows].double().reshape(-1, hd) @ r).reshape(-1).to(bias.dtype)
    wo = proj.weight.data  # [hidden, local heads * hd]
    blocks = wo.double().reshape(wo.shape[0], -1, hd)
    wo.copy_((blocks @ r).reshape(wo.shape).to(wo.dtype))


def run(model: nn.Module, opts: Options, forward_loop, dp_group) -> dict:
    mods = _attention_modules(model)
    cfg = mods[0].linear_qkv.config
    hd = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    r = rotation(hd, seed=opts.seed)
    for attn in progress(mods, "rotate_heads"):
        rotate_attention(attn, r)
    return {}
