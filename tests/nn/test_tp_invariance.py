"""Calibration under tensor and data parallelism equals the single-process result.

The same tiny GPT (TP=1 weights, sharded by hand into the TP=2 model) is quantized with several
recipes at TP=1, TP=2 (with and without sequence parallelism) and DP=2. Every amax, gathered to
its unsharded form, and the evaluation loss must match the TP=1 run. Calibration batches are
split over DP ranks, so the DP=2 case also checks the DP reduction. Tolerances: amax values
come from the same numbers up to the order of the row-parallel sums (rtol 1e-5); the losses
are float32 forwards (atol 1e-4 on a loss of ~5.5).
"""

import pytest
import torch
import yaml

from tests.distributed_utils import run_ranks
from tests.sharding import on_two_rank_layouts, random_batches, tiny_full_state

RECIPES = ["nvfp4", "fp8_per_channel", "int8"]


def _full_amax(model, tp_group):
    """Every amax in unsharded form (each layer gathers over its own TP group, ``tp_group``)."""
    from tests.sharding import unsharded_amax

    return unsharded_amax(model)


def _quantize_all(groups, tp, sp, full_state):
    import megaquant
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider
    from tests.sharding import shard_state_dict

    cfg = tiny_gpt_config()
    # SP: seq % tp == 0
    calib, evals = [b[:, :-1] for b in random_batches(4, 1)], random_batches(2, 2)
    results = {}
    for recipe in RECIPES:
        model = build_gpt_model(cfg, get_spec_provider("local"), tp_size=tp, sequence_parallel=sp)
        shard_state_dict(model, full_state, groups.tp_rank, tp)
        megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                           dp_group=groups.dp_group)
        results[recipe] = {"loss": evaluate_loss(model, evals, groups.dp_group),
                           "amax": _full_amax(model, groups.tp_group)}
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_calibration_tp2_sp_and_dp2_match_single_process(megatron_single):
    full = tiny_full_state()
    ref = _quantize_all(megatron_single, 1, False, full)
    by_rank = run_ranks(on_two_rank_layouts, 2, (_quantize_all, full), timeout_s=240)
    runs = {layout: [r[layout] for r in by_rank] for layout in by_rank[0]}
    for layout, ranks in runs.items():
        for rank, res in enumerate(ranks):
            for recipe in RECIPES:
                got, want = res[recipe], ref[recipe]
                assert got["amax"].keys() == want["amax"].keys(), (layout, recipe)
                assert len(want["amax"]) > 0
                for k in want["amax"]:
                    torch.testing.assert_close(got["amax"][k], want["amax"][k], rtol=1e-5,
                                               atol=0, msg=f"{layout} rank {rank} {recipe} {k}")
                assert abs(got["loss"] - want["loss"]) < 1e-4, (layout, rank, recipe)


def _save_quantized_tp2(full_state, ckpt, recipe):
    import megaquant
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.recipe import RECIPE_DIR
    from megaquant.spec import get_spec_provider
    from tests.sharding import shard_state_dict

    init_distributed(timeout_s=120)
    groups = init_model_parallel(tp=2)
    model = build_gpt_model(tiny_gpt_config(), get_spec_provider("local"), tp_size=2)
    shard_state_dict(model, full_state, groups.tp_rank, 2)
    calib = [b[:, :-1] for b in random_batches(4, 1)]
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group)
    # As scripts/ptq.py does: the recipe mapping travels in the checkpoint metadata.
    recipe_config = yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text())
    save_checkpoint(model, ckpt, metadata={"recipe_config": recipe_config})
    return {"loss": evaluate_loss(model, random_batches(2, 2), groups.dp_group),
            "amax": _full_amax(model, groups.tp_group)}


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_quantized_checkpoint_saved_at_tp2_loads_at_tp1(megatron_single, tmp_path):
    from megaquant.evaluate import evaluate_loss
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.ptq import load_quantized

    full = tiny_full_state()
    for recipe in ("fp8_per_channel", "nvfp4"):
        ckpt = str(tmp_path / recipe)
        saved = run_ranks(_save_quantized_tp2, 2, (full, ckpt, recipe), timeout_s=200)[0]
        torch.manual_seed(123)  # different initial weights: everything must come from the file
        model = build_gpt_model(tiny_gpt_config(), tp_size=1)
        load_quantized(model, ckpt)
        got = _full_amax(model, megatron_single.tp_group)
        assert got.keys() == saved["amax"].keys() and got
        for k in got:
            assert torch.equal(got[k], saved["amax"][k]), (recipe, k)
        loss = evaluate_loss(model, random_batches(2, 2), megatron_single.dp_group)
        assert abs(loss - saved["loss"]) < 1e-4, recipe
