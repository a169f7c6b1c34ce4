"""scripts/qat.py end to end under torchrun (2 ranks, DP=2, the tiny model): it trains, saves,
resumes from its own checkpoint, and refuses to resume with another recipe."""

import json

import pytest

from tests.distributed_utils import run_script


def _run(args, nproc=2, timeout=500):
    return run_script("qat.py", args, nproc=nproc, timeout=timeout)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_qat_script_trains_saves_and_resumes(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: " * 200)
    out = tmp_path / "out"
    base = ["model=tiny", "model.seq_length=32", "model.global_batch_size=4",
            "model.micro_batch_size=1", f"data.calib_text={text}", f"data.eval_text={text}",
            "data.train_samples=16", "data.eval_samples=4", "data.micro_batch=2",
            f"run.output_dir={out}", "model.optim.lr=1e-3"]
    res = _run(base + ["model.quantization=nvfp4", "trainer.max_steps=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 2/2 | loss" in res.stdout + res.stderr  # the progress line
    s = json.loads((out / "summary.json").read_text())
    assert s["parallel"]["dp"] == 2 and s["steps"] == {"start": 0, "end": 2}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    res = _run(base + ["model.quantization=nvfp4", "trainer.max_steps=3"])
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == {"start": 2, "end": 3} and len(s["train_losses"]) == 1
    res = _run(base + ["model.quantization=int4_w4a16", "trainer.max_steps=4"])
    assert res.returncode != 0
    assert "'nvfp4'" in res.stderr and "'int4_w4a16'" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_qat_script_takes_a_recipe_file(tmp_path):
    """``model.quantization=PATH``: a recipe file outside recipes/ (as the mixed-precision
    search writes) is the recipe QAT trains with."""
    import yaml

    from megaquant.recipe import RECIPE_DIR

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: " * 200)
    recipe = yaml.safe_load((RECIPE_DIR / "fp8.yaml").read_text())
    recipe["name"] = "my_fp8"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    res = _run(["model=tiny", "model.seq_length=32", "model.global_batch_size=2",
                "model.micro_batch_size=1", f"data.calib_text={text}", f"data.eval_text={text}",
                "data.train_samples=4", "data.eval_samples=2", "data.micro_batch=2",
                f"run.output_dir={out}", f"model.quantization={path}", "trainer.max_steps=1"],
               nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["recipe"] == "my_fp8"
