"""Per-layer quantizer state: a recipe that gives transformer layers different formats.

Megatron stacks each tensor of a transformer layer over layers in a distributed checkpoint;
an amax that is per channel in one layer, per tensor in another and absent in a third cannot
be stacked. Such stacks are stored under per-layer keys (``megaquant.convert.
mark_per_layer_state``). Reference: the amax values and the loss of the model that was saved
(exact equality: loading copies the same float32 numbers).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.sharding import random_batches, tiny_full_state

MIXED = {
    "version": 2, "name": "mixed_test",
    "rules": [
        {"modules": "*", "weight": {"format": "fp8", "dtype": "e4m3", "axis": 0},
         "input": {"format": "fp8", "dtype": "e4m3"}},
        {"modules": "decoder.layers.1.*", "weight": {"format": "nvfp4"},
         "input": {"format": "nvfp4"}},
        {"modules": "decoder.layers.0.mlp.linear_fc2", "weight": None, "input": None},
    ],
}


def _save_quantized(full_state, ckpt, tp):
    import megaquant
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider
    from tests.sharding import shard_state_dict, unsharded_amax

    init_distributed(timeout_s=120)
    groups = init_model_parallel(tp=tp)
    model = build_gpt_model(tiny_gpt_config(), get_spec_provider("local"), tp_size=tp)
    shard_state_dict(model, full_state, groups.tp_rank, tp)
    calib = [b[:, :-1] for b in random_batches(4, 1)]
    megaquant.quantize(model, MIXED, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group)
    save_checkpoint(model, ckpt, metadata={"recipe_config": MIXED})
    return {"loss": evaluate_loss(model, random_batches(2, 2), groups.dp_group),
            "amax": unsharded_amax(model)}


def _load_and_compare(saved, ckpt, group):
    from megaquant.evaluate import evaluate_loss
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.ptq import load_quantized
    from tests.sharding import unsharded_amax

    torch.manual_seed(123)  # different initial weights: everything must come from the file
    model = build_gpt_model(tiny_gpt_config(), tp_size=1)
    load_quantized(model, ckpt)
    got = unsharded_amax(model)
    shapes = {k: tuple(v.shape) for k, v in got.items()}
    # The recipe really is mixed: per-channel fp8 in layer 0, per-tensor nvfp4 in layer 1,
    # and no amax at all for layer 0's fc2.
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight_quantizer"][0] == 256
    assert shapes["decoder.layers.1.mlp.linear_fc1.weight_quantizer"] == ()
    assert "decoder.layers.0.mlp.linear_fc2.weight_quantizer" not in got
    assert got.keys() == saved["amax"].keys()
    for k in got:
        assert torch.equal(got[k], saved["amax"][k]), k
    assert abs(evaluate_loss(model, random_batches(2, 2), group) - saved["loss"]) < 1e-4


def test_mixed_recipe_marks_only_differing_stacks(megatron_single):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.ptq import restore

    model = build_gpt_model(tiny_gpt_config(), tp_size=1)
    restore(model, MIXED)
    marked = {n for n, m in model.named_modules() if getattr(m, "per_layer_amax", False)}
    assert {"decoder.layers.0.mlp.linear_fc2", "decoder.layers.1.mlp.linear_fc2"} <= marked
    assert "decoder.layers.0.self_attention.linear_qkv" in marked  # fp8 vs nvfp4
    uniform = build_gpt_model(tiny_gpt_config(), tp_size=1)
    restore(uniform, "nvfp4")
    assert not any(getattr(m, "per_layer_amax", False) for m in uniform.modules())


def test_mixed_recipe_checkpoint_roundtrip_tp1(megatron_single, tmp_path):
    full = tiny_full_state()
    saved = _save_quantized(full, str(tmp_path / "ckpt"), 1)
    _load_and_compare(saved, str(tmp_path / "ckpt"), megatron_single.dp_group)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_mixed_recipe_checkpoint_saved_at_tp2_loads_at_tp1(megatron_single, tmp_path):
    full = tiny_full_state()
    ckpt = str(tmp_path / "ckpt")
    saved = run_ranks(_save_quantized, 2, (full, ckpt, 2), timeout_s=240)[0]
    _load_and_compare(saved, ckpt, megatron_single.dp_group)
