"""Sequential GPTQ replaying cached block inputs (calib/replay.py) gives the full-forward result.

Reference: the same sequential GPTQ with every stage running the whole model (the path taken
where replay does not apply), on the same weights. Replay runs the same ops on the same
tensors, so the weights must be bit-identical (``torch.equal``), including a recipe whose first
quantized block is not layer 0 (the window starts at the embedding) and one with an online
transform and activation quantizers (``nvfp4_mrgptq``).
"""

import pytest
import torch

import megaquant
from megaquant.calib import gptq
from megaquant.evaluate import run_forward
from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

SEQ = 16
REPLAYED_LOOPS = gptq._replayed_loops  # before any monkeypatch


def _calib(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, SEQ), generator=g) for _ in range(n)]


def _quantized(recipe, dp_group, *, replay: bool, monkeypatch, loop=None):
    torch.manual_seed(0)
    model = build_gpt_model(tiny_gpt_config(num_layers=3), tp_size=1).eval()
    calib = _calib()
    seen = []

    def spy(*args):
        loops = REPLAYED_LOOPS(*args) if replay else None
        seen.append(loops is not None)
        return loops

    monkeypatch.setattr(gptq, "_replayed_loops", spy)
    megaquant.quantize(model, recipe, loop or (lambda m: run_forward(m, calib, "calib", dp_group)),
                       dp_group=dp_group)
    assert seen == [replay]
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("recipe", [
    "nvfp4_mrgptq",
    {"version": 3, "name": "nvfp4_w4a16_seq_from_layer_1",
     "rules": [{"modules": "*", "weight": {"format": "nvfp4", "block_size": 16}}],
     "exclude": ["*output_layer*", "*layers.0.*"],
     "calib": {"algorithm": "gptq", "sequential": True, "act_order": True}}])
def test_replayed_sequential_gptq_is_bit_identical_to_full_forwards(megatron_single, recipe,
                                                                    monkeypatch):
    want = _quantized(recipe, megatron_single.dp_group, replay=False, monkeypatch=monkeypatch)
    got = _quantized(recipe, megatron_single.dp_group, replay=True, monkeypatch=monkeypatch)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_replay_refuses_a_forward_loop_that_changes_its_batches(megatron_single, monkeypatch):
    calls = []

    def drifting(model):  # one batch more on every call
        calls.append(1)
        run_forward(model, _calib(len(calls)), "calib", megatron_single.dp_group)

    with pytest.raises(ValueError, match="same batches in the same order"):
        _quantized("nvfp4_mrgptq", megatron_single.dp_group, replay=True,
                   monkeypatch=monkeypatch, loop=drifting)
