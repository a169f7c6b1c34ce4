"""QAT under pipeline parallelism (scripts/qat.py, 2 gloo ranks): PP=2 trains like PP=1.

Reference: the same job at parallel.pp=1 on 2 ranks (DP=2, the same global batch). At PP=2 the
steps run through Megatron's 1F1B schedule (forward and backward); the per-step losses and the
final evaluation must agree to float rounding (1e-5 relative). The tiny model has tied
embeddings, so this also checks the embedding-group gradient: if the last stage's output copy
of the embedding took a different update than the first stage's embedding, the loss of steps 2
and 3 (lr 1e-3) and the final evaluation would move away from PP=1's. Grad clipping is on
(gradient_clip_val 1.0, norms ~3): a norm not reduced over PP would clip differently.
QAD under PP is refused by name.
"""

import json

import pytest

from tests.distributed_utils import run_script


def _qat(tmp_path, name, *extra, nproc=2):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: " * 200)
    args = ["model=tiny", "model.seq_length=32", "model.global_batch_size=4",
            "model.micro_batch_size=1", f"data.calib_text={text}", f"data.eval_text={text}",
            "data.train_samples=16", "data.eval_samples=4", "data.micro_batch=2",
            f"run.output_dir={tmp_path / name}", "model.optim.lr=1e-3",
            "model.quantization=nvfp4", "trainer.max_steps=3", *extra]
    return run_script("qat.py", args, nproc=nproc, timeout=500)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_qat_pp2_losses_equal_pp1(tmp_path):
    runs = {}
    for name, extra in (("pp1", ()), ("pp2", ("parallel.pp=2",))):
        res = _qat(tmp_path, name, *extra)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    s1, s2 = runs["pp1"], runs["pp2"]
    assert s2["parallel"]["pp"] == 2 and s1["parallel"]["pp"] == 1
    assert len(s2["train_losses"]) == 3
    assert s2["train_losses"] == pytest.approx(s1["train_losses"], rel=1e-5)
    assert s2["train_losses"][-1] < s2["train_losses"][0]  # it trained
    for key in ("loss_fp", "loss_ptq", "loss_trained"):
        assert s2["eval"][key] == pytest.approx(s1["eval"][key], rel=1e-5), key


@pytest.mark.timeout(200)
def test_qad_under_pipeline_parallel_is_refused_by_name(tmp_path):
    res = _qat(tmp_path, "qad", "parallel.pp=2", "model.distill.enabled=true", nproc=1)
    assert res.returncode != 0
    assert "not yet for QAD" in res.stdout + res.stderr
