"""scripts/export.py end to end on a tiny PTQ checkpoint, and its fast failure on a used target."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.export.export_helpers import quantized_tiny

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "scripts/export.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(400)
def test_export_script_writes_layouts_and_refuses_a_used_target(megatron_single, tmp_path):
    from megaquant.megatron.checkpoint import save_checkpoint
    from megaquant.recipe import RECIPE_DIR

    model, cfg = quantized_tiny("fp8", megatron_single.dp_group)
    recipe = yaml.safe_load((RECIPE_DIR / "fp8.yaml").read_text())
    save_checkpoint(model, tmp_path / "ckpt",
                    metadata={"recipe_config": recipe, "arch": dict(vars(cfg)),
                              "source_dtype": "bfloat16"})
    out = tmp_path / "export"
    res = _run(f"checkpoint={tmp_path / 'ckpt'}", f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "export_report.json").read_text())
    assert report["scheme"] == "fp8" and sorted(report["layouts"]) == ["compressed-tensors",
                                                                       "modelopt"]
    assert report["dtype"] == "bfloat16"  # dtype=auto: the checkpoint's recorded source_dtype
    assert json.loads((out / "modelopt" / "hf_quant_config.json").read_text())["quantization"][
        "quant_algo"] == "FP8"
    assert not (out / "modelopt" / "tokenizer.json").exists()  # the random model has no tokenizer
    res = _run(f"checkpoint={tmp_path / 'ckpt'}", f"output_dir={out}")
    assert res.returncode != 0 and "not empty; pass overwrite=true" in res.stderr
    res = _run(f"checkpoint={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'other'}", "dtype=fp16")
    assert res.returncode != 0 and "dtype='fp16' is not valid" in res.stderr
    assert not (tmp_path / "other").exists()
