"""scripts/ptq.py end to end on the tiny model: outputs, summary, and fast failure on bad input."""

import json

import pytest

from tests.distributed_utils import run_script


def _text(tmp_path, name="text.txt", repeat=200):
    path = tmp_path / name
    path.write_text("To be, or not to be, that is the question: " * repeat)
    return path


def _run(args, nproc=1, timeout=400):
    return run_script("ptq.py", args, nproc=nproc, timeout=timeout)


def _tiny_args(tmp_path, recipe="fp8", *extra):
    text = _text(tmp_path)
    return [f"+recipe={recipe}", "model=tiny", f"data.calib_text={text}", f"data.eval_text={text}",
            "data.calib_samples=4", "data.eval_samples=4", "data.micro_batch=2",
            f"run.output_dir={tmp_path / 'out'}", *extra]


@pytest.mark.timeout(300)
def test_ptq_script_writes_checkpoint_summary_and_report(tmp_path):
    res = _run(_tiny_args(tmp_path, "int8"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "int8" and summary["world_size"] == 1
    assert len(summary["layers_quantized"]) == 8 and "output_layer" in summary["layers_skipped"]
    assert summary["calibration"]["tokens"] == 4 * 64
    e = summary["eval"]
    assert e["loss_fp"] > 0 and e["loss_quant"] > 0 and e["ppl_ratio"] > 0
    assert (out / "checkpoint" / "megaquant.json").exists()
    meta = json.loads((out / "checkpoint" / "megaquant.json").read_text())["metadata"]
    assert meta["source_dtype"] == "float32"  # what export dtype=auto writes (random model)
    assert "int8" in (out / "report.md").read_text()
    # The saved checkpoint is itself a model source: same weights, so the same fp loss.
    again = _run([a for a in _tiny_args(tmp_path, "fp8") if not a.startswith("model=")]
                 + ["model=megatron", f"model.path={out / 'checkpoint'}", "model.seq_length=64",
                    f"run.output_dir={tmp_path / 'again'}", "run.save_checkpoint=false"])
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert abs(s2["eval"]["loss_fp"] - e["loss_fp"]) < 1e-6


@pytest.mark.parametrize("override, message", [
    ("+recipe=nvfp5", "unknown recipe|Could not find 'recipe/nvfp5'"),
    ("data.eval_text=/nonexistent/hamlet.txt", "data.eval_text"),
    ("parallel.tp=3", "tensor parallel must be"),
])
@pytest.mark.timeout(200)
def test_ptq_script_bad_input_fails_fast_with_a_remedy(tmp_path, override, message):
    args = _tiny_args(tmp_path)
    key = override.split("=")[0]
    args = [a for a in args if not a.startswith(key + "=")] + [override]
    res = _run(args)
    assert res.returncode != 0
    import re

    assert re.search(message, res.stdout + res.stderr), (res.stdout + res.stderr)[-2000:]
    assert not (tmp_path / "out" / "checkpoint").exists()


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_ptq_torchrun_dp2_matches_single_process(tmp_path):
    single = _run(_tiny_args(tmp_path, "nvfp4", "run.save_checkpoint=false"))
    assert single.returncode == 0, single.stderr[-3000:]
    s1 = json.loads((tmp_path / "out" / "summary.json").read_text())
    (tmp_path / "out" / "summary.json").unlink()
    two = _run(_tiny_args(tmp_path, "nvfp4"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    s2 = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["parallel"]["dp"] == 2
    # Same data, split over two DP ranks: amax reduced over DP, loss averaged over tokens.
    for key in ("loss_fp", "loss_quant"):
        assert abs(s2["eval"][key] - s1["eval"][key]) < 1e-4, key


@pytest.mark.timeout(200)
def test_ptq_script_refuses_layer_split_that_does_not_fit(tmp_path):
    # The tiny model has 2 layers: 3 stages cannot each get one. Refused before any group
    # exists (one process is enough to see it), naming the sizes and what would fit.
    res = _run(_tiny_args(tmp_path, "fp8", "parallel.pp=3"))
    assert res.returncode != 0
    assert "the model has 2 layers: parallel.pp=3" in res.stdout + res.stderr
    assert "parallel.pp <= 2" in res.stdout + res.stderr
    assert not (tmp_path / "out" / "checkpoint").exists()


@pytest.mark.timeout(300)
def test_ptq_script_takes_a_recipe_file_outside_recipes(tmp_path):
    """``+recipe=PATH`` (as the mixed-precision search writes): the file's recipe is the one run."""
    import yaml

    from megaquant.recipe import RECIPE_DIR

    recipe = yaml.safe_load((RECIPE_DIR / "int8.yaml").read_text())
    recipe["name"] = "my_int8"
    path = tmp_path / "elsewhere" / "my recipe.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(recipe))
    res = _run(_tiny_args(tmp_path, str(path), "run.save_checkpoint=false"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["recipe"] == "my_int8"
    assert summary["recipe_config"]["rules"][0]["weight"]["format"] == "int8"
    missing = _run(_tiny_args(tmp_path, str(tmp_path / "nope.yaml")))
    assert missing.returncode != 0 and "nope.yaml" in missing.stderr
    assert "does not exist" in missing.stderr


def test_recipe_path_overrides_register_files_for_ptq_and_qat(tmp_path):
    from hydra.core.config_store import ConfigStore

    from megaquant.jobs.hydra import recipe_path_overrides

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nrules: [{modules: '*', weight: {format: fp8}}]\n")
    assert recipe_path_overrides(["+recipe=nvfp4", "x=1.yaml"]) == ["+recipe=nvfp4", "x=1.yaml"]
    assert recipe_path_overrides([f"+recipe={path}"]) == ["+recipe=_file_r"]
    qat = recipe_path_overrides([f"model/quantization={path}"], keys=("model/quantization",),
                                group="model/quantization")
    assert qat == ["model/quantization=_file_r"]
    node = ConfigStore.instance().load("model/quantization/_file_r.yaml").node
    assert node.name == "r"


@pytest.mark.timeout(400)
def test_ptq_script_auto_writes_a_recipe_that_reruns_the_same(tmp_path):
    """``auto.formats=[...] auto.effective_bits=...``: the search's recipe.yaml lands beside the
    checkpoint, and running it back with ``+recipe=PATH`` gives the same quantized loss."""
    import yaml

    args = [a for a in _tiny_args(tmp_path) if not a.startswith("+recipe=")]
    res = _run(args + ["auto.formats=[nvfp4,fp8]", "auto.effective_bits=6.0"])
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert summary["auto"]["effective_bits"] <= 6.0 and written["auto"]["budget_bits"] == 6.0
    assert {g["format"] for g in written["auto"]["groups"]} == {"nvfp4", "fp8"}
    assert "Mixed precision" in (out / "report.md").read_text()
    again = _run(_tiny_args(tmp_path, str(out / "recipe.yaml"), "run.save_checkpoint=false",
                            f"run.output_dir={tmp_path / 'again'}"))
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert s2["recipe_config"]["rules"] == summary["recipe_config"]["rules"]
    assert abs(s2["eval"]["loss_quant"] - summary["eval"]["loss_quant"]) < 1e-6
    bad = _run(args + ["auto.formats=[nvfp4,fp8]", "auto.effective_bits=3.0"],)
    assert bad.returncode != 0 and "outside what candidates" in bad.stderr
