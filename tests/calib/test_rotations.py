"""Rotations on the tiny GPT (one process): the float model is unchanged, bad models are refused.

Reference: the same model before the rotation, float32 logits, compared at 1e-4 relative (max
abs difference over the max abs logit). Norm gammas are randomised first so that folding them is
exercised (a fresh model has gamma = 1, which folds trivially).
"""

import pytest
import torch

from megaquant.calib.passes import run_algorithm
from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
from megaquant.recipe_calib import CalibConfig

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


@pytest.mark.parametrize("groups", [2, 4])  # GQA (2 heads per V) and plain multi-head
def test_head_rotation_keeps_float32_logits(megatron_single, groups):
    model, tokens = _model(num_query_groups=groups), _tokens()
    ref = logits(model, tokens)
    proj0 = model.decoder.layers[0].self_attention.linear_proj.weight.clone()
    _rotate(model, ["rotate_heads", "rotate_residual"], megatron_single.dp_group)
    assert not torch.allclose(model.decoder.layers[0].self_attention.linear_proj.weight, proj0)
    assert rel_err(logits(model, tokens), ref) < 1e-4


def test_residual_rotation_refuses_layernorm_and_sizes_without_hadamard(megatron_single):
    with pytest.raises(ValueError, match="RMSNorm.*LayerNorm.*commute"):
        _rotate(_model(normalization="LayerNorm"), "rotate_residual", megatron_single.dp_group)
    with pytest.raises(ValueError, match="order 92.*Paley.*block"):
        _rotate(_model(hidden_size=92, num_attention_heads=2), "rotate_residual",
                megatron_single.dp_group)
    model, tokens = _model(hidden_size=92, num_attention_heads=2), _tokens()
    ref = logits(model, tokens)
    _rotate(model, {"algorithm": "rotate_residual", "block": 4}, megatron_single.dp_group)
    assert rel_err(logits(model, tokens), ref) < 1e-4


NVFP4 = {"name": "nvfp4_t", "rules": [{"modules": "*", "weight": {"format": "nvfp4"},
                                        "input": {"format": "nvfp4"}}]}
W4A16 = {"name": "w4a16_t", "rules": [{"modules": "*", "weight": {"format": "nvfp4"}}]}


def test_block_hadamard_is_exact_in_float_and_restored_from_the_recipe(megatron_single):
    from megaquant.ptq import restore
    from megaquant.quantizer import disable_quantizers

    model, tokens = _model(), _tokens()
    ref = logits(model, tokens)
    recipe = NVFP4 | {"calib": [{"algorithm": "block_hadamard", "modules": ["*linear_fc2",
                                                                            "*linear_proj"]}]}
    restore(model, NVFP4)
    _rotate(model, recipe["calib"], megatron_single.dp_group)
    disable_quantizers(model)
    fc2 = model.decoder.layers[0].mlp.linear_fc2
    assert fc2.input_transform.block == 16
    assert rel_err(logits(model, tokens), ref) < 1e-4
    fresh = _model()
    restore(fresh, recipe)  # a checkpoint's model gets the online transform from the recipe
    assert fresh.decoder.layers[1].self_attention.linear_proj.input_transform.block == 16
    assert fresh.decoder.layers[1].self_attention.linear_qkv.input_transform is None


def test_block_hadamard_refuses_straddling_blocks_and_late_smoothing(megatron_single):
    from megaquant.ptq import restore

    model = _model()
    restore(model, NVFP4)
    with pytest.raises(ValueError, match="128 input columns.*block 256.*straddle"):
        _rotate(model, {"algorithm": "block_hadamard", "block": 256}, megatron_single.dp_group)
    with pytest.raises(ValueError, match="smoothquant after block_hadamard"):
        CalibConfig.from_dict(["block_hadamard", "smoothquant"])


def test_sequential_gptq_without_activation_quantizers_matches_plain_gptq_on_block_0(
        megatron_single):
    """Weight-only: block 0 sees the same (unquantized) inputs either way, bit-exactly; block 1
    sees block 0's GPTQ'd output only in the sequential run, so its weights differ."""
    from megaquant.evaluate import run_forward
    from megaquant.ptq import quantize

    calib = [_tokens(seed=s) for s in (3, 4)]
    loop = lambda m: run_forward(m, calib, "calib", megatron_single.dp_group)  # noqa: E731
    out = {}
    for seq in (False, True):
        model = _model()
        quantize(model, W4A16, loop, dp_group=megatron_single.dp_group,
                 calib={"algorithm": "gptq", "sequential": seq})
        out[seq] = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    for k in out[True]:
        if "layers.0." in k:
            assert torch.equal(out[True][k], out[False][k]), k
    assert not torch.equal(out[True]["decoder.layers.1.mlp.linear_fc2.weight"],
                           out[False]["decoder.layers.1.mlp.linear_fc2.weight"])
