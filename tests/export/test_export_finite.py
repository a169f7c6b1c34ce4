"""Non-finite weights and scales are refused before save and before export, whatever the recipe.

Before, a NaN weight under int4_w4a16 (scales computed from the weight at use, no calibrated
amax, so no calibration check) went through PTQ and export into a NaN ``weight_scale``.
"""

import pytest
import torch

from tests.export.export_helpers import quantized_tiny

LAYER = "decoder.layers.0.mlp.linear_fc2"


@pytest.fixture(scope="module")
def models(megatron_single):
    return {r: quantized_tiny(r, megatron_single.dp_group) for r in ("int4_w4a16", "fp8", "nvfp4")}


def _poison(model, attr, value):
    """Set one element of ``LAYER.<attr>`` to ``value``; returns (tensor, its old values)."""
    tensor = model.get_submodule(LAYER)
    for part in attr.split("."):
        tensor = getattr(tensor, part)
    saved = tensor.detach().clone()
    if tensor.numel():
        with torch.no_grad():
            tensor.view(-1)[min(3, tensor.numel() - 1)] = value
    return tensor, saved


@pytest.mark.parametrize("recipe", ["int4_w4a16", "fp8", "nvfp4"])
@pytest.mark.parametrize("attr, value", [("weight", float("nan")), ("weight", float("inf")),
                                         ("weight_quantizer.amax", float("nan"))])
def test_nonfinite_quantized_tensor_is_named(models, recipe, attr, value):
    from megaquant.finite import check_quantized_finite

    model, _ = models[recipe]
    tensor, saved = _poison(model, attr, value)
    try:
        if tensor.numel() == 0:
            pytest.skip(f"{recipe} keeps no weight amax")
        with pytest.raises(FloatingPointError, match=rf"before saving.*{LAYER}.{attr} \("):
            check_quantized_finite(model, before="saving the checkpoint")
    finally:
        with torch.no_grad():
            tensor.copy_(saved)
    check_quantized_finite(model, before="saving the checkpoint")  # restored: passes


def test_int4_export_with_nan_weight_writes_nothing(models, tmp_path):
    from megaquant.export import export_model

    model, cfg = models["int4_w4a16"]
    tensor, saved = _poison(model, "weight", float("nan"))
    try:
        with pytest.raises(FloatingPointError, match=rf"before export.*{LAYER}.weight"):
            export_model(model, cfg, tmp_path / "out")
    finally:
        with torch.no_grad():
            tensor.copy_(saved)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_nonfinite_unquantized_tensor(models, tmp_path):
    from megaquant.export import export_model

    model, cfg = models["fp8"]
    emb = model.embedding.word_embeddings.weight
    saved = emb.detach().clone()
    with torch.no_grad():
        emb[0, 0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match=r"non-finite tensors before writing.*embed"):
            export_model(model, cfg, tmp_path / "out")
    finally:
        with torch.no_grad():
            emb.copy_(saved)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_nan_in_one_tp_shard_stops_every_rank():
    """The verdict is all-reduced: a NaN only in rank 1's shard must not leave rank 0 saving
    (and then waiting in the save's collectives)."""
    from tests.distributed_utils import run_ranks
    from tests.export.finite_tp_worker import nan_on_rank1

    rank0, rank1 = run_ranks(nan_on_rank1, 2, timeout_s=240)
    assert "on another rank" in rank0, rank0
    assert f"{LAYER}.weight (1 NaN" in rank1, rank1
