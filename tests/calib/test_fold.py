"""Folding a per-channel scale into the producer of a linear's input (calib/fold.py).

Reference: the unquantized tiny GPT (4 query heads sharing 2 KV groups, i.e. GQA). Folding any
tied scale into each producer, including the V rows of ``linear_qkv`` before ``linear_proj``,
must leave the float loss unchanged (atol 1e-5 on ~5.5, float32 rounding of the rescaled
weights); an untied scale for ``linear_proj`` is refused instead of silently changing the model.
"""

import pytest
import torch

from megaquant.calib.fold import Producer, fold_input_scale, producer_of
from megaquant.evaluate import evaluate_loss
from megaquant.models.gpt import build_gpt_model, tiny_gpt_config


def _evals():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (2, 17), generator=g) for _ in range(2)]


def test_producers_of_every_block_linear(megatron_single):
    model = build_gpt_model(tiny_gpt_config(), tp_size=1)
    kinds = {leaf: producer_of(model, f"decoder.layers.0.{leaf}").kind
             for leaf in ("self_attention.linear_qkv", "self_attention.linear_proj",
                          "mlp.linear_fc1", "mlp.linear_fc2")}
    assert kinds == {"self_attention.linear_qkv": "norm", "self_attention.linear_proj": "qkv_v",
                     "mlp.linear_fc1": "norm", "mlp.linear_fc2": "fc1_up"}
    p = producer_of(model, "decoder.layers.0.self_attention.linear_proj")
    assert (p.heads_per_group, p.head_dim) == (2, 16)
    assert producer_of(model, "output_layer") is None


def test_folding_tied_scales_everywhere_leaves_the_float_model_unchanged(megatron_single):
    torch.manual_seed(0)
    model = build_gpt_model(tiny_gpt_config(), tp_size=1)
    ref = evaluate_loss(model, _evals(), megatron_single.dp_group)
    qkv_before = model.decoder.layers[0].self_attention.linear_qkv.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    for layer in range(2):
        for leaf in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                     "mlp.linear_fc2"):
            name = f"decoder.layers.{layer}.{leaf}"
            lin, prod = model.get_submodule(name), producer_of(model, name)
            s = prod.tie(torch.rand(lin.weight.shape[1], generator=g) * 4 + 0.25, "max")
            with torch.no_grad():
                fold_input_scale(lin, prod, s)
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert not torch.equal(qkv, qkv_before)  # V rows (and the norm-side columns) moved
    assert abs(evaluate_loss(model, _evals(), megatron_single.dp_group) - ref) < 1e-5


def test_an_untied_scale_for_linear_proj_is_refused(megatron_single):
    model = build_gpt_model(tiny_gpt_config(), tp_size=1)
    name = "decoder.layers.0.self_attention.linear_proj"
    lin, prod = model.get_submodule(name), producer_of(model, name)
    s = torch.linspace(0.5, 2.0, lin.weight.shape[1])  # differs between heads of one group
    with pytest.raises(ValueError, match="tied over the heads"):
        fold_input_scale(lin, prod, s)


def test_tie_takes_the_max_or_mean_over_the_heads_of_a_group():
    p = Producer("qkv_v", torch.nn.Linear(1, 1), heads_per_group=2, head_dim=2)
    v = torch.tensor([1.0, 4.0, 3.0, 2.0, 5.0, 0.0, 7.0, 8.0])  # 2 groups x 2 heads x 2 dims
    torch.testing.assert_close(p.tie(v, "max"), torch.tensor([3.0, 4, 3, 4, 7, 8, 7, 8]))
    torch.testing.assert_close(p.tie(v, "mean"), torch.tensor([2.0, 3, 2, 3, 6, 4, 6, 4]))
