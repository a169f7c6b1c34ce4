"""Residual-stream rotation (QuaRot's R1): rotate the hidden dimension by a randomized Hadamard.

A pre-norm transformer only ever *adds* into its residual stream ``x`` (embeddings, attention
and MLP outputs) and *reads* it through an RMSNorm followed by linears. Replace ``x`` by ``x Q``
for an orthogonal ``Q`` (hidden x hidden) everywhere and nothing changes, provided that:

1. every RMSNorm gamma is folded into the linears that read it (``W <- W diag(gamma)``,
   ``gamma <- 1``): RMSNorm without gamma commutes with ``Q`` (``rms(x Q) = rms(x)``), an
   elementwise gamma does not;
2. the writers rotate their outputs: the embedding rows ``E <- E Q``, and the output side of
   ``linear_proj`` / ``linear_fc2`` (``W <- Q^T W``, bias ``b <- b Q``);
3. the readers rotate their inputs: ``linear_qkv``, ``linear_fc1`` and the output layer
   (``W <- W Q``).

The float model computes the same logits (up to float rounding: tested at 1e-4 relative in
float32) and costs nothing at run time: everything is in the weights. What changes is what the
quantizers see: a Hadamard ``Q`` spreads each outlier channel of the residual stream over all
channels, so per-tensor and per-block activation scales of qkv/fc1 inputs, and the weights'
rows, lose their extreme values. ``Q = diag(signs) H / sqrt(n)`` with ``H`` a Hadamard matrix of
the hidden size (:mod:`megaquant.transforms.hadamard`; e.g. 576 = Paley(36) x 16) and random
signs from ``seed``; ``block: B`` uses a block-diagonal Hadamard instead (for hidden sizes with
no construction, or to keep mixing local).

Tied embeddings: folding the final norm's gamma into the output layer makes it differ from the
input embedding, so the model is *untied* (``output_layer.weight`` becomes its own parameter, as
the shared decision on tied embeddings says). :func:`prepare` does only that, so restoring a
checkpoint of a rotated model builds the same parameters (``megaquant.ptq.restore``).

Refused: LayerNorm models (the mean subtraction and bias do not commute with a rotation; QuaRot
converts them first), zero-centred gammas, MoE models (the router and every expert would have to
be rotated: not done yet), and TE's fused norm-linears (norms must be separate modules).

Parallel rules: ``Q`` is built on every rank from the same seed in float64 (identical
everywhere); every weight is rotated along its *hidden* dimension, which tensor parallelism
never splits (embedding and output rows are split by vocabulary, qkv/fc1 rows and proj/fc2
columns by heads / MLP width), so each rank rotates its own shard and no collective runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from megaquant.calib.capture import progress
from megaquant.recipe_calib import RotateResidualOptions as Options
from megaquant.transforms.hadamard import rotation

_LAYER = re.compile(r"(^|.*\.)decoder\.layers\.\d+$")


@dataclass
class Parts:
    """The pieces of a GPTModel that read and write the residual stream."""

    gpt: nn.Module
    embedding: nn.Module
    layers: list
    final_norm: nn.Module
    output_layer: nn.Module
    hidden: int


def find_parts(model: nn.Module) -> Parts:
    """The residual-stream pieces of ``model`` (a Megatron GPTModel), or ValueError why not."""
    gpt = next((m for _, m in model.named_modules() if hasattr(m, "output_layer")
                and hasattr(m, "embedding") and hasattr(m, "decoder")), None)
    if gpt is None:
        raise ValueError("rotate_residual needs a Megatron GPTModel (embedding, decoder, "
                         "output_layer), with first and last pipeline stage in this process")
    cfg = gpt.config
    if getattr(cfg, "num_moe_experts", None):
        raise ValueError("rotate_residual: MoE models are not supported yet (the router and "
                         "every expert would need rotating); use a dense model or drop the step")
    if cfg.normalization != "RMSNorm" or getattr(cfg, "layernorm_zero_centered_gamma", False):
        raise ValueError(
            f"rotate_residual folds RMSNorm gammas into the following linears, but this model "
            f"uses {cfg.normalization}"
            f"{' with zero-centred gamma' if cfg.layernorm_zero_centered_gamma else ''}: "
            "LayerNorm subtracts the mean and adds a bias, which do not commute with a rotation. "
            "Remove rotate_residual from calib for this model.")
    layers = [m for n, m in model.named_modules() if _LAYER.match(n)]
    for layer in layers:
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            if not isinstance(getattr(norm, "weight", None), torch.Tensor) or \
                    getattr(norm, "bias", None) is not None:
                raise ValueError(f"rotate_residual: the norm {type(norm).__name__} of a layer "
                                 "has no separate gamma (or has a bias): it cannot be folded. "
                                 "Build the model with separate RMSNorm modules (megaquant's "
                                 "GPT specs do).")
    return Parts(gpt, gpt.embedding.word_embeddings, layers, gpt.decoder.final_layernorm,
                 gpt.output_layer, cfg.hidden_size)


def untie(gpt: nn.Module) -> bool:
    """Give the output layer its own weight (a copy of the embedding); True if it was tied."""
    if not gpt.share_embeddings_and_output_weights:
        return False
    w = gpt.embedding.word_embeddings.weight
    gpt.output_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    gpt.share_embeddings_and_output_weights = False
    return True


def prepare(model: nn.Module, opts: Options) -> None:
    """The structural change a rotated model has (untied output layer): run on restore too."""
    untie(find_parts(model).gpt)


def _apply(param: torch.Tensor, fn) -> None:
    """``param <- fn(param in float64)``, in place, in the parameter's dtype."""
    param.data.copy_(fn(param.data.double()).to(param.dtype))


def fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """``W <- W diag(gamma)`` for every reader, then ``gamma <- 1``."""
    g = norm.weight.data.double()
    for lin in readers:
        _apply(lin.weight, lambda w: w * g[None, :])
    norm.weight.data.fill_(1.0)


def rotate_input(layer: nn.Module, q: torch.Tensor) -> None:
    _apply(layer.weight, lambda w: w @ q)


def rotate_output(layer: nn.Module, q: torch.Tensor) -> None:
    _apply(layer.weight, lambda w: q.t() @ w)
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() == q.shape[0]:
        _apply(bias, lambda b: b @ q)


def run(model: nn.Module, opts: Options, forward_loop, dp_group) -> dict:
    parts = find_parts(model)
    untie(parts.gpt)
    q = rotation(parts.hidden, block=opts.block, seed=opts.seed)
    _apply(parts.embedding.weight, lambda e: e @ q)
    for layer in progress(parts.layers, "rotate_residual"):
        attn, mlp = layer.self_attention, layer.mlp
        fold_norm(layer.input_layernorm, [attn.linear_qkv])
        fold_norm(layer.pre_mlp_layernorm, [mlp.linear_fc1])
        rotate_input(attn.linear_qkv, q)
        rotate_input(mlp.linear_fc1, q)
        rotate_output(attn.linear_proj, q)
        rotate_output(mlp.linear_fc2, q)
    fold_norm(parts.final_norm, [parts.output_layer])
    rotate_input(parts.output_layer, q)
    return {}
