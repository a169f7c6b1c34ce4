"""QAT resume takes the newest intact kept step: a damaged ``latest`` falls back, and says so."""

import logging

import pytest
import torch

from tests.export.export_helpers import quantized_tiny


@pytest.fixture(scope="module")
def two_steps(megatron_single, tmp_path_factory):
    from megaquant.train.state import save_train_state

    model, _ = quantized_tiny("fp8", megatron_single.dp_group)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path_factory.mktemp("qat") / "checkpoints"
    for step in (1, 2):
        save_train_state(model, opt, root, step=step, metadata={"recipe_config": None}, keep=2)
    return model, opt, root


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def test_resume_falls_back_to_older_intact_step(two_steps, caplog):
    from megaquant.train.state import load_train_state, resume_checkpoint

    model, opt, root = two_steps
    assert resume_checkpoint(root).name == "step_0000002"
    _truncate(root / "step_0000002" / "__0_0.distcp")
    with caplog.at_level(logging.WARNING, logger="megaquant.train"):
        chosen = resume_checkpoint(root)
    assert chosen.name == "step_0000001"
    assert "newest intact" in caplog.text and "step_0000002" in caplog.text
    assert "__0_0.distcp" in caplog.text
    meta = load_train_state(model, opt, chosen, recipe_config=None,
                            layout={"tp": 1, "dp": 1, "ep": 1, "world_size": 1})
    assert meta["step"] == 1

    _truncate(root / "step_0000001" / ".metadata")
    with pytest.raises(ValueError, match=r"no intact checkpoint.*step_0000002.*step_0000001.*"
                                         r"trainer.resume=false"):
        resume_checkpoint(root)


def test_resume_with_nothing_saved_starts_fresh(tmp_path):
    from megaquant.train.state import resume_checkpoint

    assert resume_checkpoint(tmp_path / "checkpoints") is None


def test_train_checkpoint_with_nan_weight_is_not_saved(two_steps):
    from megaquant.train.state import save_train_state

    model, opt, root = two_steps
    weight = model.get_submodule("decoder.layers.0.mlp.linear_fc1").weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match=r"step 3.*linear_fc1.weight \(1 NaN"):
            save_train_state(model, opt, root, step=3, metadata={"recipe_config": None})
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not (root / "step_0000003").exists()


def test_leftovers_of_a_killed_step_save_are_cleaned(tmp_path):
    from megaquant.train.state import recover_step_leftovers

    for name in (".step_0000004.partial", ".step_0000002.old", "step_0000003", ".step_0000003.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    notes = recover_step_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]
    assert (tmp_path / "step_0000002" / "f").read_text() == ".step_0000002.old"  # restored
    assert (tmp_path / "step_0000003" / "f").read_text() == "step_0000003"  # the newer one kept
    assert len(notes) == 3 and any("restored" in n for n in notes)
