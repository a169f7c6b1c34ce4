"""QAT under pipeline parallelism (scripts/qat.py, 2 gloo ranks): PP=2 trains like PP=1.

Reference: the same job at parallel.pp=1 on 2 ranks (DP=2, the same global batch). At PP=2 the
steps run through Megatron's 1F1B schedule (forward and backward); the per-step losses and the
final evaluation must agree to float rounding (1e-5 relative). The tiny model has tied
embeddings, so this also checks the embedding-group gradient: if the last stage's output copy
of the embedding took a different update than the first stage's embedding, the loss of steps 2
and 3 (lr 1e-3) and the final evaluation would move away from PP=1's. Grad clipping is on
(gradient_clip_val 1.0, norms ~3): a norm not reduced over PP would clip differently.
QAD at PP=2 (the teacher staged the same way) gives PP=1's per-step losses (slow: ~90 s).
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


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_qad_pp2_losses_equal_pp1(tmp_path):
    # The teacher is staged like the student; its activations travel with the student's
    # (train/pipeline_distill.py). KL at temperature 2 plus half the LM loss, so both terms
    # and the vocab-parallel KL on the last stage are exercised. If the teacher's half of the
    # stacked activations were mixed up with the student's, the step-1 KL (student = quantized
    # teacher, KL ~1e-2) would be off by orders of magnitude, not by rounding.
    qad = ("model.distill.enabled=true", "model.distill.lm_weight=0.5",
           "model.distill.temperature=2.0")
    runs = {}
    for name, extra in (("pp1", qad), ("pp2", (*qad, "parallel.pp=2"))):
        res = _qat(tmp_path, name, *extra)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    s1, s2 = runs["pp1"], runs["pp2"]
    assert s2["mode"] == "qad" and s2["parallel"]["pp"] == 2 and s1["parallel"]["pp"] == 1
    assert len(s2["train_losses"]) == 3
    assert s2["train_losses"] == pytest.approx(s1["train_losses"], rel=1e-5)
    assert s2["train_losses"][-1] < s2["train_losses"][0]  # it trained
    for key in ("loss_fp", "loss_ptq", "loss_trained"):
        assert s2["eval"][key] == pytest.approx(s1["eval"][key], rel=1e-5), key
