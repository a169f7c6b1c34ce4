"""QAT with learnable scales (global amax + NVFP4 per-block weight amax) under TP=2 and EP=2
equals the single-process run; resume at TP=2 is exact; the TP=2 checkpoint (learned scales
and their AdamW moments included) loads at TP=1 and evaluates the same.

What is compared, and why not more steps. The LSQ gradient of a scale sums ``R(y) - y`` over
every element it scales: terms of both signs that jump by a whole step when an element crosses
a rounding boundary, so the sum is a discontinuous function of the weights. Measured in one
process: perturbing the initial weights by 1e-7 (relative) moves the step-3 loss by 5e-4 with
learnable scales, by 2e-7 without. TP=2 sums its GEMMs in another order (a ~1e-7 perturbation),
so losses are compared for 2 steps (within 1e-5, as test_qat_parallel), and the gradient rules
(megaquant/train/learnable.py) are checked where they act: the reduced first-step gradient of
every shared amax at TP=2 equals the single-process one within 2e-4 relative (measured 3e-5;
a missing TP sum is off by ~50%, a sum where the column-parallel input is replicated by 100%),
and each block_amax gradient's TP-summed |g| and g^2 within 1e-5 (sharded: no sum). Resume at
TP=2 is compared bit for bit (same layout, same order); the TP=2 -> TP=1 reshard by the
evaluation loss of the resharded model (another layout's forward: 1e-5).
"""

import pytest
import torch
import torch.distributed as dist

from tests.distributed_utils import run_ranks
from tests.qat import helpers as h

STEPS = 2


def _scales():
    from megaquant.train.config import LearnableScalesConfig

    return LearnableScalesConfig(enabled=True, per_block=True, lr_scale=10.0)


def _first_grads(groups, full):
    """Reduced first-step gradients: shared amax as is, block_amax as TP-summed |g|, g^2."""
    from megaquant.train.optim import reduce_gradients
    from megaquant.train.step import StepContext, micro_batch_loss

    model = h.build(groups, full, scales=_scales())
    _, _, batch, distill = h.settings()
    ctx = StepContext(h.windows(), batch, groups.dp_group, groups.tp_group, distill)
    for tokens in h.windows()[:batch.global_batch_size].split(batch.micro_batch_size):
        (micro_batch_loss(model, tokens, ctx) / tokens.numel()).backward()
    reduce_gradients(model, dp_group=groups.dp_group, tp_group=groups.tp_group)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(".amax"):
            out[name] = p.grad.double().reshape(1)
        elif name.endswith(".block_amax"):
            s = torch.stack([p.grad.abs().sum(), p.grad.pow(2).sum()]).double()
            if groups.tp > 1:
                dist.all_reduce(s, group=groups.tp_group)
            out[name] = s
    return out


def _two_ranks(full, moe_full, ckpt):
    import yaml

    from megaquant.evaluate import evaluate_loss
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.recipe import RECIPE_DIR
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state, save_train_state

    init_distributed(timeout_s=250)
    out = {}
    groups = init_model_parallel(tp=2)
    out["grads"] = _first_grads(groups, full)
    out["tp2"] = h.train_run(groups, full, steps=STEPS, scales=_scales())[2]
    recipe = yaml.safe_load((RECIPE_DIR / f"{h.RECIPE}.yaml").read_text())
    m1, o1, first = h.train_run(groups, full, stop_after=2, scales=_scales())
    save_train_state(m1, o1, ckpt, step=2, metadata={"recipe_config": recipe})
    second = h.train_run(groups, full, start=2, model=m1, optimizer=o1, scales=_scales())[2]
    m2 = h.build(groups, h.full_state(seed=99), calibrate=False, scales=_scales())
    o2 = build_optimizer(m2, h.settings()[1], _scales().lr_scale)
    step = load_train_state(m2, o2, f"{ckpt}/step_0000002", recipe_config=recipe,
                            layout={"tp": 2, "dp": 1, "world_size": 2})["step"]
    out["resumed"] = (second, h.train_run(groups, full, start=step, model=m2, optimizer=o2,
                                          scales=_scales())[2])
    save_train_state(m2, o2, ckpt, step=4, metadata={"recipe_config": recipe})
    out["tp2_eval"] = evaluate_loss(m2, h.eval_batches(), groups.dp_group)
    groups = init_model_parallel(tp=1, ep=2)
    model = h.build_moe(groups, moe_full, scales=_scales())
    out["ep2"] = [r["loss"] for r in h.train_records(groups, model, steps=STEPS,
                                                      scale_lr_scale=10.0)[1]]
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_learnable_scales_tp2_ep2_resume_reshard(megatron_single, tmp_path):
    import yaml

    from megaquant.evaluate import evaluate_loss
    from megaquant.recipe import RECIPE_DIR
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state

    full, moe_full = h.full_state(), h.full_moe_state()
    ckpt = str(tmp_path / "ckpt")
    model, _, ref = h.train_run(megatron_single, full, steps=STEPS, scales=_scales())
    fixed = h.train_run(megatron_single, full, steps=STEPS)[2]
    assert abs(ref[-1] - fixed[-1]) > 1e-5, "the scales did not learn anything"
    start = {n: p.detach().clone() for n, p in
             h.build(megatron_single, full, scales=_scales()).named_parameters()}
    moved = [n for n, p in model.named_parameters()
             if getattr(p, "quant_scale", False) and not torch.equal(p, start[n])]
    assert any(n.endswith(".amax") for n in moved) and any("block_amax" in n for n in moved)
    ref_grads = _first_grads(megatron_single, full)
    moe = h.build_moe(megatron_single, moe_full, scales=_scales())
    ref_ep = [r["loss"] for r in h.train_records(megatron_single, moe, steps=STEPS,
                                                  scale_lr_scale=10.0)[1]]

    res = run_ranks(_two_ranks, 2, (full, moe_full, ckpt), timeout_s=380)
    for rank, r in enumerate(res):
        assert r["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            tol = 2e-4 if name.endswith(".amax") else 1e-5
            assert torch.allclose(r["grads"][name], g, rtol=tol, atol=0), (rank, name)
        assert r["tp2"] == pytest.approx(ref, abs=1e-5), rank
        assert r["resumed"][0] == r["resumed"][1], f"rank {rank}: resume is not exact"
        assert r["ep2"] == pytest.approx(ref_ep, abs=1e-5), rank

    recipe = yaml.safe_load((RECIPE_DIR / f"{h.RECIPE}.yaml").read_text())
    m = h.build(megatron_single, h.full_state(seed=7), calibrate=False, scales=_scales())
    opt = build_optimizer(m, h.settings()[1], 10.0)
    load_train_state(m, opt, f"{ckpt}/step_0000004", recipe_config=recipe,
                     layout={"tp": 1, "dp": 1, "world_size": 1})
    loss = evaluate_loss(m, h.eval_batches(), megatron_single.dp_group)
    assert loss == pytest.approx(res[0]["tp2_eval"], abs=1e-5)
