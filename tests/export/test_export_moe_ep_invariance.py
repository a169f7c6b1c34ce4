"""Exports of MoE checkpoints saved at EP=1, EP=2 and TP=2 (expert-TP=2) are byte-identical.

The same EP=1 weights (distinct per expert) are sharded by hand (``tests.moe.moe_helpers``:
expert e to EP rank e // local, then the TP split; independent of Megatron's resharding) into
the EP=2 and TP=2 x EP=1 models, which are quantized there. Weight amax values are maxima, exact
under any split; activation amax values may differ in the last bit between layouts, so the
parallel runs adopt the EP=1 activation amax (as test_export_tp_invariance.py does). The export
then loads each checkpoint at TP=1, EP=1 and must write the same bytes: every expert from every
EP rank under its global index, expert-TP shards joined along the right axis. An EP=2 model
handed to ``export_model`` directly is refused (its local expert indices are not global).
"""

from pathlib import Path

import pytest
import yaml

from tests.distributed_utils import run_ranks

RECIPES = ["nvfp4", "fp8_per_channel"]


def _cfg():
    from megaquant.models.gpt import tiny_moe_config

    return tiny_moe_config(moe_token_dispatcher="alltoall")


def _quantize_and_save(groups, full, recipe, ckpt, input_amax=None):
    """Quantize this rank's shard of ``full``; adopt ``input_amax`` (global names); save."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.models.gpt import build_gpt_model
    from megaquant.recipe import RECIPE_DIR
    from tests.moe.moe_helpers import batches, global_name, load_sharded

    cfg = _cfg()
    local = cfg.num_moe_experts // groups.ep
    model = build_gpt_model(cfg, tp_size=groups.tp, ep_size=groups.ep)
    load_sharded(model, full, groups.tp_rank, groups.tp, groups.ep_rank, local)
    calib = [b[:, :-1] for b in batches(4, 1)]  # the same count on every DP rank
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group)
    amax = {}
    for name, m in model.named_modules():
        if name.endswith("input_quantizer") and m.is_enabled:
            key = global_name(name, groups.ep_rank, local)
            if input_amax is not None:
                m.load_amax(input_amax[key])
            amax[key] = m.amax.clone()
    meta = {"recipe_config": yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text()),
            "arch": dict(vars(cfg))}
    save_checkpoint(model, ckpt, metadata=meta)
    return model, amax


def _save_parallel(full, ckpts, input_amax):
    from megaquant.export import export_model
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=150)
    refused = None
    for layout, (tp, ep) in (("ep2", (1, 2)), ("tp2", (2, 1))):
        groups = init_model_parallel(tp=tp, ep=ep)
        for recipe in RECIPES:
            model, _ = _quantize_and_save(groups, full, recipe, ckpts[layout][recipe],
                                          input_amax[recipe])
            if layout == "ep2" and refused is None:
                try:
                    export_model(model, _cfg(), f"{ckpts['ep2'][recipe]}-direct-{groups.ep_rank}")
                except ValueError as e:
                    refused = str(e)
    return refused


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_export_moe_of_ep1_ep2_and_tp2_checkpoints_is_byte_identical(megatron_single, tmp_path):
    from megaquant.export import export_checkpoint
    from tests.moe.moe_helpers import full_moe_state

    full = full_moe_state(_cfg())
    ckpts = {layout: {r: str(tmp_path / f"{layout}_{r}") for r in RECIPES}
             for layout in ("ep1", "ep2", "tp2")}
    amax = {r: _quantize_and_save(megatron_single, full, r, ckpts["ep1"][r])[1] for r in RECIPES}
    refused = run_ranks(_save_parallel, 2, (full, ckpts, amax), timeout_s=420)
    for msg in refused:
        assert msg and "expert-parallel" in msg and "export_checkpoint" in msg, msg
    assert not list(tmp_path.glob("*-direct-*"))
    for recipe in RECIPES:
        outs = {}
        for layout in ("ep1", "ep2", "tp2"):
            export_checkpoint(ckpts[layout][recipe], tmp_path / f"out_{layout}_{recipe}",
                              dtype="bfloat16")  # every layout, compressed-tensors NVFP4 included
            outs[layout] = _files(tmp_path / f"out_{layout}_{recipe}")
        one = outs["ep1"]
        assert len(one) >= 3 and any("safetensors" in k for k in one), sorted(one)
        for layout in ("ep2", "tp2"):
            assert outs[layout].keys() == one.keys(), (layout, sorted(outs[layout]))
            for name in one:
                assert outs[layout][name] == one[name], f"{recipe}: {name} differs, ep1 vs {layout}"
