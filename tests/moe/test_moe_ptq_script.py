"""``scripts/ptq.py model=tiny_moe parallel.ep=2`` under torchrun (2 processes) end to end."""

import json

import pytest

from tests.distributed_utils import run_script


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ptq_script_tiny_moe_ep2(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: " * 200)
    res = run_script("ptq.py", ["+recipe=fp8", "model=tiny_moe", "parallel.ep=2",
                                f"data.calib_text={text}", f"data.eval_text={text}",
                                "data.calib_samples=4", "data.eval_samples=4", "data.micro_batch=2",
                                "run.timeout_s=120", f"run.output_dir={tmp_path / 'out'}"],
                     nproc=2, timeout=380)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["parallel"]["ep"] == 2 and summary["world_size"] == 2
    # Rank 0 reports its own layers: attention + its 2 local experts x 2 linears, per layer.
    experts = [n for n in summary["layers_quantized"] if ".experts.local_experts." in n]
    assert len(experts) == 2 * 2 * 2, summary["layers_quantized"]
    assert not any("router" in n for n in summary["layers_quantized"])
    assert summary["calibration"]["expert_inputs_without_tokens"] == []
    e = summary["eval"]
    assert 0.9 < e["ppl_ratio"] < 1.1, e  # fp8 on a random model barely moves the loss
    meta = json.loads((tmp_path / "out" / "checkpoint" / "megaquant.json").read_text())
    assert meta["parallel"]["ep"] == 2
