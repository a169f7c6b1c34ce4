"""Rotations on the tiny GPT (one process): the float model is unchanged, bad models are refused.

Reference: the same model before the rotation, float32 logits, compared at 1e-4 relative (max
abs difference over the max abs logit). Norm gammas are randomised first so that folding them is
exercised (a fresh model has gamma = 1, which folds trivially).
"""

import pytest
import torch

from megaquant.calib.algorithms import CalibConfig, run_algorithm
from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

SEQ = 16


def _model(seed=0, **cfg):
    torch.manual_seed(seed)
    model = build_gpt_model(tiny_gpt_config(**cfg), tp_size=1).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "layernorm" in name and name.endswith("weight"):
            p.data.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def _tokens(seed=2, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SEQ), generator=g)


@torch.no_grad()
def logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _rotate(model, calib, dp_group):
    run_algorithm(model, CalibConfig.from_dict(calib), None, dp_group)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("opts", [{}, {"block": 16}, {"seed": None}])
def test_residual_rotation_keeps_float32_logits(megatron_single, tied, opts):
    model, tokens = _model(tie_embeddings=tied), _tokens()
    ref = logits(model, tokens)
    qkv0 = model.decoder.layers[0].self_attention.linear_qkv.weight.clone()
    _rotate(model, {"algorithm": "rotate_residual", **opts}, megatron_single.dp_group)
    assert not torch.allclose(model.decoder.layers[0].self_attention.linear_qkv.weight, qkv0)
    assert rel_err(logits(model, tokens), ref) < 1e-4
    assert not model.share_embeddings_and_output_weights  # untied (a no-op when it was untied)
    norms = [p for n, p in model.named_parameters() if "layernorm" in n]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)  # gammas folded


def test_residual_rotation_refuses_layernorm_and_sizes_without_hadamard(megatron_single):
    with pytest.raises(ValueError, match="RMSNorm.*LayerNorm.*commute"):
        _rotate(_model(normalization="LayerNorm"), "rotate_residual", megatron_single.dp_group)
    with pytest.raises(ValueError, match="order 92.*Paley.*block"):
        _rotate(_model(hidden_size=92, num_attention_heads=2), "rotate_residual", megatron_single.dp_group)
    model, tokens = _model(hidden_size=92, num_attention_heads=2), _tokens()
    ref = logits(model, tokens)
    _rotate(model, {"algorithm": "rotate_residual", "block": 4}, megatron_single.dp_group)
    assert rel_err(logits(model, tokens), ref) < 1e-4
