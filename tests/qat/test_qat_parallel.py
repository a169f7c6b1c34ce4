"""QAT and QAD under TP=2 and DP=2 equal the single-process run; resume is exact; a checkpoint
saved at TP=2 loads at TP=1 (weights, quantizer state and optimizer state).

One 2-rank spawn runs every layout (Megatron's import is the expensive part). References:
the single-process run in this process, from the same TP=1 weights and data. Tolerances:
DP=2 sums the same micro-batch gradients (losses within 1e-6; measured 0); TP=2 splits the
GEMM sums, so its losses (~5.5) may differ in the last float32 bits, and a fake-quantization
rounding tie could flip: compared within 1e-5 (measured 2.4e-7 QAT, 3.6e-7 QAD over 4 steps).
Resume is compared bit for bit; the resharded optimizer state too (same bytes, moved).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.qat import helpers as h


def _two_ranks(full, ckpt):
    import yaml

    from megaquant.evaluate import evaluate_loss
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.recipe import RECIPE_DIR
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state, save_train_state

    init_distributed(timeout_s=200)
    out = {}
    groups = init_model_parallel(tp=1)  # DP=2
    out["dp2"] = h.train_run(groups, full)[2]
    groups = init_model_parallel(tp=2)
    model, opt, out["tp2"] = h.train_run(groups, full)
    out["tp2_qad"] = h.train_run(groups, full, distill=True)[2]
    # Exact resume at TP=2: 2 steps, save, a fresh model + optimizer, load, 2 more steps.
    recipe = yaml.safe_load((RECIPE_DIR / f"{h.RECIPE}.yaml").read_text())
    layout = {"tp": 2, "dp": 1, "world_size": 2}
    m1, o1, first = h.train_run(groups, full, stop_after=2)
    save_train_state(m1, o1, ckpt, step=2, metadata={"recipe_config": recipe})
    m2 = h.build(groups, h.full_state(seed=99), calibrate=False)  # everything from the file
    o2 = build_optimizer(m2, h.settings()[1])
    step = load_train_state(m2, o2, f"{ckpt}/step_0000002", recipe_config=recipe,
                            layout=layout)["step"]
    second = h.train_run(groups, full, start=step, model=m2, optimizer=o2)[2]
    out["tp2_resumed"] = first + second
    save_train_state(m2, o2, ckpt, step=4, metadata={"recipe_config": recipe})
    out["tp2_eval"] = evaluate_loss(m2, h.eval_batches(), groups.dp_group)
    out["tp2_exp_avg"] = h.full_optimizer_state(m2, o2, groups.tp_group)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_qat_layouts_resume_and_reshard(megatron_single, tmp_path):
    import yaml

    from megaquant.evaluate import evaluate_loss
    from megaquant.recipe import RECIPE_DIR
    from megaquant.train.optim import build_optimizer
    from megaquant.train.state import load_train_state

    full = h.full_state()
    ckpt = str(tmp_path / "ckpt")
    ref_model, ref_opt, ref = h.train_run(megatron_single, full)
    ref_qad = h.train_run(megatron_single, full, distill=True)[2]
    res = run_ranks(_two_ranks, 2, (full, ckpt), timeout_s=280)
    for rank, r in enumerate(res):
        assert r["dp2"] == pytest.approx(ref, abs=1e-6), rank
        assert r["tp2"] == pytest.approx(ref, abs=1e-5), rank
        assert r["tp2_qad"] == pytest.approx(ref_qad, abs=1e-5), rank
        assert r["tp2_resumed"] == r["tp2"], f"rank {rank}: resume is not exact"

    # Reshard: the TP=2 checkpoint at TP=1 gives the TP=2 evaluation loss, and its optimizer
    # state, reassembled by dist_checkpointing, equals the TP=2 state gathered by hand.
    recipe = yaml.safe_load((RECIPE_DIR / f"{h.RECIPE}.yaml").read_text())
    model = h.build(megatron_single, h.full_state(seed=7), calibrate=False)
    opt = build_optimizer(model, h.settings()[1])
    meta = load_train_state(model, opt, f"{ckpt}/step_0000004", recipe_config=recipe,
                            layout={"tp": 1, "dp": 1, "world_size": 1})
    assert meta["step"] == 4
    loss = evaluate_loss(model, h.eval_batches(), megatron_single.dp_group)
    assert loss == pytest.approx(res[0]["tp2_eval"], abs=1e-5)
    got = h.full_optimizer_state(model, opt, megatron_single.tp_group)
    assert got.keys() == res[0]["tp2_exp_avg"].keys()
    for k, v in got.items():
        assert torch.equal(v, res[0]["tp2_exp_avg"][k]), k
        assert v.abs().sum() > 0, k  # real state, not zeros on both sides

    # Another recipe: an error that names both, before anything is loaded.
    other = yaml.safe_load((RECIPE_DIR / "int4_w4a16.yaml").read_text())
    with pytest.raises(ValueError, match=r"'nvfp4'.*'int4_w4a16'"):
        load_train_state(model, opt, f"{ckpt}/step_0000004", recipe_config=other,
                         layout={"tp": 1, "dp": 1, "world_size": 1})
