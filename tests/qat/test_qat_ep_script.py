"""``scripts/qat.py model=tiny_moe parallel.ep=2`` under torchrun (2 processes, EP=2): it
calibrates, trains, saves an EP=2 train checkpoint and resumes from it."""

import json
import math

import pytest

from tests.distributed_utils import run_script


def _run(args, timeout=300):
    return run_script("qat.py", args, nproc=2, timeout=timeout)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(650)
def test_qat_script_tiny_moe_ep2_trains_and_resumes(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: " * 200)
    out = tmp_path / "out"
    base = ["model=tiny_moe", "parallel.ep=2", "model.quantization=fp8", "model.seq_length=32",
            "model.global_batch_size=4", "model.micro_batch_size=1", f"data.calib_text={text}",
            f"data.eval_text={text}", "data.train_samples=16", "data.calib_samples=4",
            "data.eval_samples=4", "data.micro_batch=2", "model.optim.lr=1e-3",
            "run.timeout_s=120", f"run.output_dir={out}"]
    res = _run(base + ["trainer.max_steps=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 2/2 | loss" in res.stdout + res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["parallel"]["ep"] == 2 and s["parallel"]["dp"] == 2 and s["world_size"] == 2
    assert len(s["train_losses"]) == 2 and all(math.isfinite(x) for x in s["train_losses"])
    assert s["eval"]["loss_trained"] < s["eval"]["loss_ptq"]  # lr 1e-3 on repeated text
    ckpt = out / "checkpoints" / "step_0000002" / "megaquant.json"
    assert json.loads(ckpt.read_text())["parallel"]["ep"] == 2
    res = _run(base + ["trainer.max_steps=3"])
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == {"start": 2, "end": 3} and len(s["train_losses"]) == 1
