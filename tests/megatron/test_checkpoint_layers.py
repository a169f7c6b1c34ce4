"""A checkpoint of another depth is refused with both layer counts and what would fit.

Reference: the same checkpoint loads into a model of its own depth and gives back its weights.
Without the check, Megatron's loader fails on a stacked tensor's global shape
("Global shape mismatch ... (torch.Size([4, 64])) and expected ((2, 64))"), which names no
layers. The PP=2 side (a 3-layer checkpoint into 4-layer pipeline stages) is checked in
tests/jobs/test_ptq_pipeline.py.
"""

import pytest
import torch


@pytest.fixture(scope="module")
def four_layer_checkpoint(megatron_single, tmp_path_factory):
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(0)
    arch = tiny_gpt_config(num_layers=4)
    model = build_gpt_model(arch)
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(model, directory, metadata={"arch": dict(vars(arch))})
    return model, directory


@pytest.mark.parametrize("layers", [2, 6])
def test_load_checkpoint_other_depth_names_both_counts(four_layer_checkpoint, layers):
    from megaquant.megatron.checkpoint import load_checkpoint
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    _, directory = four_layer_checkpoint
    model = build_gpt_model(tiny_gpt_config(num_layers=layers))
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, directory)
    text = str(err.value)
    assert "holds a model of 4 decoder layers" in text
    assert f"the model built here has {layers}" in text
    assert "model.arch.num_layers=4" in text and "model.source=megatron" in text


def test_load_checkpoint_same_depth_still_loads(four_layer_checkpoint):
    from megaquant.megatron.checkpoint import load_checkpoint
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    saved, directory = four_layer_checkpoint
    torch.manual_seed(1)  # other random weights, replaced by the load
    model = build_gpt_model(tiny_gpt_config(num_layers=4))
    load_checkpoint(model, directory)
    for (name, a), b in zip(saved.state_dict().items(), model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
