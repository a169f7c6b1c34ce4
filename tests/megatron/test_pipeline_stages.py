"""The pipeline split (pure): Megatron's layer counts, uneven splits, errors that say what fits."""

import pytest
import torch

from megaquant.megatron.stages import (
    global_name,
    split_layers,
    stage_layout,
    stage_state,
)


def _megatron_counts(num_layers, pp, first=None, last=None):
    """Megatron's own answer (get_num_layers_to_build) for every pipeline rank."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                            pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                            num_layers_in_first_pipeline_stage=first,
                            num_layers_in_last_pipeline_stage=last)
    return [get_num_layers_to_build(cfg, pp_rank=r) for r in range(pp)]


@pytest.mark.parametrize("num_layers,pp,first,last", [
    (2, 2, None, None), (30, 3, None, None), (30, 2, 14, None), (30, 4, 6, 6), (5, 2, None, 2),
    (7, 3, 1, 4),
])
def test_split_matches_megatron(num_layers, pp, first, last):
    sizes = split_layers(num_layers, pp, first, last)
    assert sum(sizes) == num_layers
    assert sizes == _megatron_counts(num_layers, pp, first, last)


@pytest.mark.parametrize("num_layers,pp,first,last,words", [
    (30, 4, None, None, ["30 layers", "parallel.pp=4", "[1, 2, 3, 5, 6, 10, 15, 30]",
                         "pp_first_layers"]),
    (2, 3, None, None, ["2 layers", "parallel.pp <= 2"]),
    (30, 4, 5, None, ["25 layers for 3 other stage(s)"]),
    (30, 2, 30, None, ["pp_first_layers=30 must be in 1..29"]),
    (4, 1, 2, None, ["need parallel.pp > 1"]),
])
def test_split_refuses_with_sizes_and_remedy(num_layers, pp, first, last, words):
    with pytest.raises(ValueError) as err:
        split_layers(num_layers, pp, first, last)
    for word in words:
        assert word in str(err.value)


def test_stage_state_renumbers_layers_and_ties_output_to_embedding():
    full = {"embedding.word_embeddings.weight": torch.ones(4, 2),
            "decoder.final_layernorm.weight": torch.ones(2)}
    for n in range(5):
        full[f"decoder.layers.{n}.mlp.linear_fc1.weight"] = torch.full((2, 2), float(n))
    first, last = stage_layout(5, 2, 0, first=3), stage_layout(5, 2, 1, first=3)
    s0, s1 = stage_state(full, first, tied=True), stage_state(full, last, tied=True)
    assert sorted(s0) == ["decoder.layers.0.mlp.linear_fc1.weight",
                          "decoder.layers.1.mlp.linear_fc1.weight",
                          "decoder.layers.2.mlp.linear_fc1.weight",
                          "embedding.word_embeddings.weight"]
    assert s1["decoder.layers.1.mlp.linear_fc1.weight"][0, 0] == 4.0  # global layer 4
    assert s1["output_layer.weight"] is full["embedding.word_embeddings.weight"]
    assert "embedding.word_embeddings.weight" not in s1
    assert "output_layer.weight" not in stage_state(full, last, tied=False)
    assert global_name("module.decoder.layers.1.self_attention.linear_qkv", last) == \
        "module.decoder.layers.4.self_attention.linear_qkv"
    assert global_name("output_layer", last) == "output_layer"
