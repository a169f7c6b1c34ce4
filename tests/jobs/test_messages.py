"""Bad input gets an error naming the config key / file and the remedy (reliability cases)."""

import pytest


def test_binary_calibration_text_names_key_and_path(tmp_path):
    from megaquant.data import read_text

    path = tmp_path / "binary.bin"
    path.write_bytes(bytes([0xEB, 0x00, 0xFF, 0xFE]) * 10)
    with pytest.raises(ValueError, match=rf"data.calib_text='{path}' is not UTF-8 text"):
        read_text(path, config_key="data.calib_text")


@pytest.mark.parametrize("key", ["data.calib_samples", "data.eval_samples", "data.micro_batch",
                                 "model.seq_length", "data.train_samples"])
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_below_one_are_refused_by_key(key, value):
    from omegaconf import OmegaConf

    from megaquant.jobs.common import check_data_sizes

    cfg = OmegaConf.create({"model": {"seq_length": 64},
                            "data": {"calib_samples": 8, "eval_samples": 8, "micro_batch": 2,
                                     "train_samples": 16}})
    check_data_sizes(cfg)  # the valid config passes
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ValueError, match=rf"{key}={value}: must be a whole number >= 1"):
        check_data_sizes(cfg)


def test_recipe_mismatch_names_the_option_that_differs():
    from megaquant.train.state import recipe_differences

    saved = {"name": "nvfp4", "rules": [{"modules": "*", "weight": {"format": "nvfp4",
                                                                     "block_size": 7}}]}
    now = {"name": "nvfp4", "rules": [{"modules": "*", "weight": {"format": "nvfp4",
                                                                   "block_size": 16}}]}
    assert recipe_differences(saved, now) == \
        "rules[0].weight.block_size: 7 in the checkpoint, 16 in this run"


@pytest.mark.parametrize("fmt, block, ok", [("nvfp4", 7, False), ("nvfp4", 32, False),
                                            ("nvfp4", 16, True), ("int4", 7, False),
                                            ("int4", 48, False), ("int4", 32, True)])
def test_unservable_block_sizes_are_refused_at_recipe_time(fmt, block, ok):
    from megaquant.recipe import load_recipe

    recipe = {"name": "r", "rules": [{"modules": "*", "weight": {"format": fmt,
                                                                 "block_size": block}}]}
    if ok:
        load_recipe(recipe)
        return
    with pytest.raises(ValueError, match=rf"rules\[0\].weight.*block_size={block} is not servable"):
        load_recipe(recipe)


def test_layout_refusal_is_not_self_contradictory():
    import torch

    from megaquant.export.export import _resolve_layouts

    with pytest.raises(ValueError) as info:
        _resolve_layouts(["modelopt"], "fp8_per_channel", torch.float32)
    msg = str(info.value)
    assert "cannot be written as ['modelopt']" in msg
    assert "layouts that can write it: ['compressed-tensors']" in msg
    assert "compressed-tensors has no layout" not in msg


def test_export_overwrite_hint_names_a_real_key(tmp_path):
    from megaquant.export.writer import check_target

    (tmp_path / "keep").write_text("x")
    with pytest.raises(ValueError, match=r"overwrite=true") as info:
        check_target(tmp_path, overwrite=False)
    assert "export.overwrite" not in str(info.value)


def test_failed_save_removes_partial_files_and_names_target(megatron_single, tmp_path,
                                                            monkeypatch):
    from megatron.core import dist_checkpointing

    from megaquant.megatron import checkpoint
    from tests.export.export_helpers import quantized_tiny

    model, _ = quantized_tiny("fp8", megatron_single.dp_group)

    def full_disk(state, directory, *args, **kwargs):
        (checkpoint.Path(directory) / "__0_0.distcp").write_bytes(b"x" * 100)
        raise RuntimeError("Worker failure: [Errno 28] No space left on device")

    monkeypatch.setattr(dist_checkpointing, "save", full_disk)
    with pytest.raises(RuntimeError, match=rf"saving the checkpoint {tmp_path}/ckpt failed.*"
                                           r"No space left.*partial\s+files were removed"):
        checkpoint.save_checkpoint(model, tmp_path / "ckpt", metadata={})
    assert list(tmp_path.iterdir()) == []


def test_safetensors_error_names_the_file(tmp_path, monkeypatch):
    import torch

    from megaquant.export import writer

    def fail(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(writer, "save_file", fail)
    with pytest.raises(OSError, match=r"writing .*model.safetensors failed.*No space left"):
        writer.write_safetensors(tmp_path, {"w": torch.zeros(2)}, 1 << 20)


def test_writer_children_die_with_their_parent(tmp_path):
    """A child forked inside die_with_parent() is SIGKILLed when its parent dies."""
    import os
    import subprocess
    import sys
    import time

    code = (
        "import os, sys, time\n"
        "from megaquant.megatron.writer_processes import die_with_parent\n"
        "with die_with_parent():\n"
        "    pid = os.fork()\n"
        "if pid == 0:\n"
        "    null = os.open(os.devnull, os.O_WRONLY); os.dup2(null, 1); os.dup2(null, 2)\n"
        "    time.sleep(120); os._exit(0)\n"
        "print(pid, flush=True)\n"
        "os._exit(0)\n")
    from tests.distributed_utils import ROOT

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=True)
    child = int(out.stdout.split()[0])
    for _ in range(100):  # the kernel delivers SIGKILL at the parent's exit; allow scheduling
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as fh:  # a zombie awaiting init's reaping is dead too
            if fh.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail(f"child {child} outlived its parent")


def _no_recipe(tmp_path):
    from omegaconf import OmegaConf

    from megaquant.jobs.ptq import _checked_inputs

    _checked_inputs(OmegaConf.create({"model": {"seq_length": 8}, "data": {}}))


def _hf_path(tmp_path):
    from megaquant.jobs.common import load_model_source

    load_model_source({"source": "hf", "path": str(tmp_path / "nope"), "seq_length": 8})


def _not_a_checkpoint(tmp_path):
    from megaquant.megatron.checkpoint import read_metadata

    read_metadata(tmp_path / "nope" / "checkpoint")


def _tokenizer(tmp_path):
    from megaquant.export.job import resolve_tokenizer

    resolve_tokenizer(str(tmp_path / "nope"), "tiny")


@pytest.mark.parametrize("case, message", [
    (_no_recipe, r"choose a recipe: \+recipe=NAME \(or a \.yaml path\), one of \["),
    (_hf_path, r"model.path '.*nope' is not a directory \(model.source=hf\)"),
    (_not_a_checkpoint,
     r"megaquant.json not found: .*nope/checkpoint is not a megaquant checkpoint"),
    (_tokenizer, r"tokenizer='.*nope': expected auto \| none \| smollm2"),
], ids=["no_recipe", "hf_path", "not_a_checkpoint", "tokenizer"])
def test_clear_refusals_name_the_problem(tmp_path, case, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        case(tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before writing anything
