"""QAT with KV-cache quantizers on: straight-through gradients, exact resume, reshard.

The tiny GPT with NVFP4 weights/activations and FP8 KV trains 4 steps at TP=1 (reference) and
at TP=2; at TP=2 it also trains 2 steps, saves, restores into a fresh model and trains 2 more.
Losses must equal TP=1's (abs 1e-5, float32 sums in another order) and the resumed run must
equal the uninterrupted one exactly; the TP=2 checkpoint loaded at TP=1 carries the same K/V
amax (replicated over TP after the MAX).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.qat import helpers as h

RECIPE = {"name": "nvfp4_fp8kv", "kv_cache": {"format": "fp8"},
          "rules": [{"modules": "*", "weight": {"format": "nvfp4"}, "input": {"format": "nvfp4"}}]}


def _kv_amax(model):
    return {n: q.amax.clone() for n, q in model.named_modules()
            if n.endswith(("k_quantizer", "v_quantizer"))}


def _run(groups, full, ckpt=None):
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state, save_train_state

    model, _, losses = h.train_run(groups, full, model=h.build(groups, full, recipe=RECIPE))
    out = {"losses": losses, "amax": _kv_amax(model)}
    if ckpt is None:
        return out
    m1, o1, first = h.train_run(groups, full, stop_after=2,
                                model=h.build(groups, full, recipe=RECIPE))
    save_train_state(m1, o1, ckpt, step=2, metadata={"recipe_config": RECIPE})
    m2 = h.build(groups, h.full_state(seed=99), recipe=RECIPE, calibrate=False)
    o2 = build_optimizer(m2, h.settings()[1])
    layout = {"tp": groups.tp, "dp": 1, "world_size": groups.tp}
    step = load_train_state(m2, o2, f"{ckpt}/step_0000002", recipe_config=RECIPE,
                            layout=layout)["step"]
    out["resumed"] = first + h.train_run(groups, full, start=step, model=m2, optimizer=o2)[2]
    return out


def _two_ranks(full, ckpt):
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=200)
    return _run(init_model_parallel(tp=2), full, ckpt)


def test_kv_qat_gradients_pass_straight_through(megatron_single):
    """K/V fake quantization is straight-through: the QKV weight gets the gradient of the
    quantized forward, which differs from the unquantized one but is finite and non-zero."""
    from megaquant.quantizer import iter_quantizers

    full = h.full_state()
    model = h.build(megatron_single, full, recipe=RECIPE)
    tokens = h.windows(2)
    grads = []
    for kv_on in (True, False):
        for n, q in iter_quantizers(model):
            if n.endswith(("k_quantizer", "v_quantizer")):
                q.mode = "static" if kv_on else "off"
        model.zero_grad()
        logits = model(tokens[:, :-1], None, None)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append(model.decoder.layers[0].self_attention.linear_qkv.weight.grad.clone())
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert not torch.equal(grads[0], grads[1])


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_kv_qat_tp2_matches_tp1_resumes_exactly_and_reshards(megatron_single, tmp_path):
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state

    full, ckpt = h.full_state(), str(tmp_path / "ckpt")
    ref = _run(megatron_single, full)
    for rank, r in enumerate(run_ranks(_two_ranks, 2, (full, ckpt), timeout_s=280)):
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5), rank
        assert r["resumed"] == r["losses"], f"rank {rank}: resume is not exact"
        assert r["amax"].keys() == ref["amax"].keys() and len(ref["amax"]) == 4
        for k in ref["amax"]:
            torch.testing.assert_close(r["amax"][k], ref["amax"][k], rtol=1e-5, atol=0)
        tp2_amax = r["amax"]
    model = h.build(megatron_single, h.full_state(seed=7), recipe=RECIPE, calibrate=False)
    load_train_state(model, build_optimizer(model, h.settings()[1]), f"{ckpt}/step_0000002",
                     recipe_config=RECIPE, layout={"tp": 1, "dp": 1, "world_size": 1})
    for k, v in _kv_amax(model).items():  # calibrated amax, unchanged by training
        torch.testing.assert_close(v, tp2_amax[k], rtol=1e-5, atol=0)
