"""Exports of a PTQ checkpoint saved at TP=2 and of one saved at TP=1 are byte-identical.

The same TP=1 weights are sharded by hand into the TP=2 model (tests/sharding.py, independent of
Megatron's resharding). Weight amax values are maxima, exact under TP; activation amax values can
differ in the last bit between layouts (different GEMM shapes), so the TP=2 run adopts the TP=1
activation amax to give both checkpoints the same quantizer state. The export then loads each at
TP=1 (Megatron's dist-ckpt gathers the shards, SwiGLU included) and must write the same bytes.
MoE checkpoints at EP=2 and TP=2 x EP=1: test_export_moe_ep_invariance.py.
"""

from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed_utils import run_ranks
from tests.export.export_helpers import batches

RECIPES = ["nvfp4", "fp8_per_channel"]


def _input_amax(model) -> dict:
    return {n: m.amax.clone() for n, m in model.named_modules()
            if n.endswith("input_quantizer") and m.is_enabled}


def _quantize_and_save(model, recipe, groups, ckpt, cfg, input_amax=None):
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.recipe import RECIPE_DIR

    calib = [b[:, :-1] for b in batches(3, 1)]
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group)
    for name, m in model.named_modules():
        if input_amax is not None and name in input_amax:
            m.load_amax(input_amax[name])
    meta = {"recipe_config": yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text()),
            "arch": dict(vars(cfg))}
    save_checkpoint(model, ckpt, metadata=meta)
    return _input_amax(model)


def _save_tp2(full, ckpts, input_amax):
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from tests.sharding import shard_state_dict

    init_distributed(timeout_s=120)
    groups = init_model_parallel(tp=2)
    for recipe in RECIPES:
        model = build_gpt_model(tiny_gpt_config(), tp_size=2)
        shard_state_dict(model, full, groups.tp_rank, 2)
        _quantize_and_save(model, recipe, groups, ckpts[recipe], tiny_gpt_config(),
                           input_amax[recipe])
    return True


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_export_of_tp2_and_tp1_checkpoints_is_byte_identical(megatron_single, tmp_path):
    from megaquant.export import export_checkpoint
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(0)
    cfg = tiny_gpt_config()
    full = {k: v.clone() for k, v in build_gpt_model(cfg, tp_size=1).state_dict().items()
            if isinstance(v, torch.Tensor)}
    amax, tp2 = {}, {r: str(tmp_path / f"tp2_{r}") for r in RECIPES}
    for recipe in RECIPES:
        model = build_gpt_model(cfg, tp_size=1)
        model.load_state_dict(full, strict=False)
        amax[recipe] = _quantize_and_save(model, recipe, megatron_single,
                                          tmp_path / f"tp1_{recipe}", cfg)
    assert run_ranks(_save_tp2, 2, (full, tp2, amax), timeout_s=300) == [True, True]
    for recipe in RECIPES:
        # bfloat16: every layout, compressed-tensors NVFP4 included
        a = export_checkpoint(tmp_path / f"tp1_{recipe}", tmp_path / f"out1_{recipe}",
                              dtype="bfloat16")
        export_checkpoint(tp2[recipe], tmp_path / f"out2_{recipe}", dtype="bfloat16")
        one, two = _files(tmp_path / f"out1_{recipe}"), _files(tmp_path / f"out2_{recipe}")
        assert one.keys() == two.keys() and len(one) >= 3, sorted(one)
        for name in one:
            assert one[name] == two[name], f"{recipe}: {name} differs between TP=1 and TP=2"
        assert a.scheme == recipe
