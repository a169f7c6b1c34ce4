"""QAD with ``model.distill.teacher``: a teacher that cannot be compared token by token with the
student (another architecture or vocabulary, a quantized checkpoint, not a model directory) is
refused before any heavy work, with the option, the differing sizes and what fits."""

import json

import pytest

TINY = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "num_query_groups": 2, "vocab_size": 256, "tie_embeddings": True}


def _student():
    from megaquant.jobs.common import load_model_source

    return load_model_source({"source": "random", "arch": TINY, "seq_length": 32})


def _checkpoint_dir(tmp_path, arch, recipe=None):
    """A directory that reads as a megaquant checkpoint (only its metadata is read here)."""
    d = tmp_path / "teacher"
    d.mkdir()
    (d / "megaquant.json").write_text(json.dumps(
        {"metadata": {"arch": arch, "recipe": recipe, "tokenizer": "bytes"}}))
    return d


@pytest.mark.parametrize("change, named", [
    ({"hidden_size": 128, "ffn_hidden_size": 256}, r"ffn_hidden_size: teacher 256, student 128, "
                                                   r"hidden_size: teacher 128, student 64"),
    ({"num_layers": 4}, r"num_layers: teacher 4, student 2"),
    ({"vocab_size": 512}, r"vocab_size: teacher 512, student 256"),
])
def test_teacher_of_another_architecture_is_refused_naming_the_fields(tmp_path, change, named):
    from megaquant.jobs.qat import load_teacher_source

    d = _checkpoint_dir(tmp_path, {**TINY, **change})
    with pytest.raises(ValueError, match=r"model.distill.teacher=.*another architecture.*"
                                         + named + r".*same layers, sizes and vocabulary"):
        load_teacher_source(str(d), _student(), 32)


def test_teacher_of_the_same_architecture_is_accepted(tmp_path):
    from megaquant.jobs.qat import load_teacher_source

    d = _checkpoint_dir(tmp_path, {**TINY, "name": "fine-tuned", "params_dtype": "bfloat16"})
    teacher = load_teacher_source(str(d), _student(), 32)
    assert teacher.checkpoint == d and teacher.arch.hidden_size == 64


def test_quantized_or_unknown_teacher_directories_are_refused(tmp_path):
    from megaquant.jobs.qat import load_teacher_source

    d = _checkpoint_dir(tmp_path, TINY, recipe="nvfp4")
    with pytest.raises(ValueError, match=r"quantized checkpoint \(recipe 'nvfp4'\).*unquantized"):
        load_teacher_source(str(d), _student(), 32)
    with pytest.raises(ValueError, match=r"neither a Hugging Face model directory.*megaquant"):
        load_teacher_source(str(tmp_path), _student(), 32)


def _job(tmp_path, *extra):
    from tests.qat.test_qat_config import _compose

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: " * 50)
    return _compose(["model=tiny", "model.seq_length=32", "model.global_batch_size=2",
                     "model.micro_batch_size=1", f"data.calib_text={text}",
                     f"data.eval_text={text}", "data.train_samples=4", "data.eval_samples=2",
                     "model.distill.enabled=true", "trainer.max_steps=1",
                     "trainer.log_every_n_steps=0", *extra])


def test_qad_job_refuses_the_teacher_before_calibrating(tmp_path, megatron_single):
    """The job path: the check runs right after the student's source is resolved."""
    from megaquant.jobs.qat import run

    d = _checkpoint_dir(tmp_path, {**TINY, "num_layers": 3})
    cfg = _job(tmp_path, f"model.distill.teacher={d}", f"run.output_dir={tmp_path / 'out'}")
    with pytest.raises(ValueError, match=r"num_layers: teacher 3, student 2"):
        run(cfg)


def test_qad_job_distils_from_the_given_teacher(tmp_path, megatron_single):
    """A teacher checkpoint of the same architecture is loaded and used: a checkpoint of the
    student's own starting weights gives the first step's loss of the default teacher; one
    with the embedding halved gives another."""
    import torch

    from megaquant.jobs.common import load_model_source
    from megaquant.jobs.ptq import build_model
    from megaquant.jobs.qat import run
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.megatron.dist import init_model_parallel

    loaded = load_model_source({"source": "random", "arch": TINY, "seq_length": 32})
    # seeded as the job seeds (run.seed=1234), not from whatever RNG state earlier tests left
    groups = init_model_parallel(1, 1, 1, seed=1234)
    model = build_model(loaded, groups, "spec", seed=1234)
    meta = {"arch": dict(vars(loaded.arch)), "recipe": None, "tokenizer": "bytes"}
    same = save_checkpoint(model, tmp_path / "same", metadata=meta)
    with torch.no_grad():  # tied embeddings: this also halves the teacher's logits
        model.embedding.word_embeddings.weight.mul_(0.5)
    other = save_checkpoint(model, tmp_path / "other", metadata=meta)
    loss = {}
    for name, teacher in (("default", "null"), ("same", same), ("other", other)):
        cfg = _job(tmp_path, f"model.distill.teacher={teacher}",
                   f"run.output_dir={tmp_path / name}")
        loss[name] = run(cfg)["train_losses"][0]
    assert loss["same"] == pytest.approx(loss["default"], rel=1e-6)
    assert abs(loss["other"] - loss["default"]) > 1e-3 * abs(loss["default"])
