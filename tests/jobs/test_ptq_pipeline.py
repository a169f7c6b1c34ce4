"""PTQ under pipeline parallelism (scripts/ptq.py, 2 gloo ranks): PP=2 equals PP=1.

Reference: the same job at parallel.pp=1 on the same number of ranks (there: two DP ranks).
The tiny model is given 3 layers so that the split is uneven (parallel.pp_last_layers=2).
Calibration and evaluation run through Megatron's pipeline schedule at PP=2 and through plain
forwards at PP=1; the loss must agree to float rounding (1e-6 relative: same weights, the
same per-layer math, the same token-weighted float64 reduction), the quantized layers must be
the same (global names), and exporting the PP=2 checkpoint (loaded at PP=1 by the exporter)
must give byte-identical files to exporting the PP=1 checkpoint, which also checks that every
amax and quantizer state saved from its stage matches. The other direction: the PP=1
checkpoint loaded into PP=2 stages (weights and quantizer state) evaluates to the PP=1 loss;
loaded into 4-layer PP=2 stages it is refused with both layer counts named.
"""

import filecmp
import json

import pytest

from tests.distributed_utils import run_ranks, run_script


def _load_at_pp2(ckpt, text):
    """Rank worker: load a checkpoint into PP=2 stages, evaluate through the schedule."""
    from megaquant.jobs.common import load_model_source, token_batches
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.megatron.pipeline import pipeline_evaluate_loss
    from megaquant.megatron.stages import stage_layout
    from megaquant.models.gpt import build_gpt_model
    from megaquant.ptq import load_quantized
    from megaquant.spec import get_spec_provider

    init_distributed(timeout_s=300)  # a hang is caught by run_ranks' own limit; load is slow
    groups = init_model_parallel(pp=2)
    loaded = load_model_source({"source": "megatron", "path": str(ckpt), "seq_length": 64})
    stage = stage_layout(loaded.arch.num_layers, 2, groups.pp_rank, first=2)
    model = build_gpt_model(loaded.arch, get_spec_provider("local"), stage=stage)
    load_quantized(model, ckpt)
    evals = token_batches(text, loaded.tokenizer, 5, 64, 2)
    loss = pipeline_evaluate_loss(model, evals, groups)
    # The same checkpoint (3 layers) into 4-layer stages (2+2): refused naming both depths.
    deeper = type(loaded.arch).from_dict({**vars(loaded.arch), "num_layers": 4})
    model = build_gpt_model(deeper, get_spec_provider("local"),
                            stage=stage_layout(4, 2, groups.pp_rank))
    try:
        load_quantized(model, ckpt)
    except ValueError as e:
        return loss, str(e)
    return loss, None


def _ptq(tmp_path, name, *extra, recipe="nvfp4"):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: " * 200)
    args = [f"+recipe={recipe}", "model=tiny", "model.arch.num_layers=3", f"data.calib_text={text}",
            f"data.eval_text={text}", "data.calib_samples=4", "data.eval_samples=5",
            "data.micro_batch=2", f"run.output_dir={tmp_path / name}", *extra]
    res = run_script("ptq.py", args, nproc=2, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


def _export(tmp_path, name):
    out = tmp_path / f"export_{name}"
    res = run_script("export.py", [f"checkpoint={tmp_path / name / 'checkpoint'}",
                                   f"output_dir={out}"], timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return out


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only), (cmp.left_only, cmp.right_only)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    for sub in cmp.common_dirs:
        _same_tree(a / sub, b / sub)


@pytest.mark.multiprocess
@pytest.mark.timeout(1800)  # a hang guard above the sum of the steps' own limits (1700 s)
def test_ptq_pp2_equals_pp1_and_exports_identically(tmp_path):
    s1 = _ptq(tmp_path, "pp1")
    s2 = _ptq(tmp_path, "pp2", "parallel.pp=2", "parallel.pp_last_layers=2")
    assert s2["parallel"] == {"tp": 1, "pp": 2, "ep": 1, "dp": 1}
    for key in ("loss_fp", "loss_quant"):
        assert s2["eval"][key] == pytest.approx(s1["eval"][key], rel=1e-6), key
    assert s2["eval"]["loss_quant"] != s2["eval"]["loss_fp"]  # quantization did something
    assert s2["layers_quantized"] == s1["layers_quantized"]
    assert s2["calibration"] == s1["calibration"]  # quantizer counts of every stage
    assert any(".layers.2." in name for name in s2["layers_quantized"])  # the last stage's
    assert s2["eval_tokens"] == s1["eval_tokens"]
    _same_tree(_export(tmp_path, "pp1"), _export(tmp_path, "pp2"))
    # PP=1 checkpoint -> PP=2 stages split 2+1 (the PP=2 run split 1+2: layouts are free).
    (loss0, err0), (loss1, err1) = run_ranks(
        _load_at_pp2, world_size=2, args=(tmp_path / "pp1" / "checkpoint", tmp_path / "text.txt"),
        timeout_s=300)
    assert loss0 == loss1 == pytest.approx(s1["eval"]["loss_quant"], rel=1e-6)
    for err in (err0, err1):  # every stage refuses, naming both layer counts
        assert err is not None and "holds a model of 3 decoder layers" in err, err
        assert "the model built here has 4" in err and "model.arch.num_layers=3" in err, err


# A hand-written mixed recipe, as the search writes them: rules name global layers (layer 2 sits
# on the last stage, numbered 1 there; layer 0's QKV stays unquantized, a stack split over
# stages), so the per-layer checkpoint keys must be chosen alike on both stages.
MIXED = {
    "version": 4, "name": "mixed_pp",
    "rules": [
        {"modules": "*", "weight": {"format": "nvfp4"}, "input": {"format": "nvfp4"}},
        {"modules": "decoder.layers.2.mlp.linear_fc2", "weight": {"format": "fp8"},
         "input": {"format": "fp8"}},
        {"modules": "decoder.layers.0.self_attention.linear_qkv", "weight": None, "input": None},
    ],
    "exclude": ["*output_layer*", "*router*"],
}


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_ptq_pp2_mixed_recipe_equals_pp1(tmp_path):
    """PTQ with a per-layer recipe file at PP=2 (split 1+2) equals PP=1: loss, layers, and
    byte-identical exports of both checkpoints (every amax, read back at PP=1); the PP=1
    checkpoint loads into PP=2 stages split 2+1 and evaluates to the PP=1 loss."""
    import yaml

    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(MIXED))
    s1 = _ptq(tmp_path, "pp1", recipe=path)
    s2 = _ptq(tmp_path, "pp2", "parallel.pp=2", "parallel.pp_last_layers=2", recipe=path)
    for key in ("loss_fp", "loss_quant"):
        assert s2["eval"][key] == pytest.approx(s1["eval"][key], rel=1e-6), key
    assert s2["layers_quantized"] == s1["layers_quantized"]
    assert "decoder.layers.0.self_attention.linear_qkv" not in s1["layers_quantized"]
    assert s2["calibration"] == s1["calibration"]
    out = _export(tmp_path, "pp2")
    _same_tree(_export(tmp_path, "pp1"), out)
    hf = json.loads((out / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "MIXED_PRECISION"
    assert hf["quantized_layers"]["model.layers.2.mlp.down_proj"]["quant_algo"] == "FP8"
    assert "model.layers.0.self_attn.q_proj" not in hf["quantized_layers"]
    losses = run_ranks(_load_at_pp2, world_size=2,
                       args=(tmp_path / "pp1" / "checkpoint", tmp_path / "text.txt"),
                       timeout_s=300)
    (loss0, _), (loss1, _) = losses  # the worker also returns the layer-count refusal
    assert loss0 == loss1 == pytest.approx(s1["eval"]["loss_quant"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1500)  # above the two runs' own limits (2 x 600 s)
@pytest.mark.parametrize("model,extra", [
    ("tiny", ["parallel.tp=2"]),      # TP splits the matmuls (another summation order)
    ("tiny_moe", ["parallel.ep=2"]),  # experts split over 2 ranks on each stage
], ids=["pp2xtp2", "pp2xep2"])
def test_ptq_pp2_times_tp_or_ep_equals_pp1(tmp_path, model, extra):
    # 4 ranks at PP=2 x (TP=2 | EP=2); reference PP=1 on 2 ranks (DP=2, or EP=2 for the MoE).
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: " * 200)
    common = ["+recipe=nvfp4", f"model={model}", f"data.calib_text={text}",
              f"data.eval_text={text}", "data.calib_samples=4", "data.eval_samples=4",
              "data.micro_batch=1", "run.save_checkpoint=false"]
    ref = extra if model == "tiny_moe" else []
    summaries = []
    for name, nproc, more in (("pp1", 2, ref), ("pp2", 4, ["parallel.pp=2", *extra])):
        res = run_script("ptq.py", [*common, f"run.output_dir={tmp_path / name}", *more],
                         nproc=nproc, timeout=600)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    s1, s2 = summaries
    assert s2["parallel"]["pp"] == 2 and s2["world_size"] == 4
    for key in ("loss_fp", "loss_quant"):
        assert s2["eval"][key] == pytest.approx(s1["eval"][key], rel=1e-5), key
    assert s2["layers_quantized"] == s1["layers_quantized"]
