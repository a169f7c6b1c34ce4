"""KV-cache amax at TP=3 on SmolLM2's real weights equals one process.

SmolLM2-135M has 9 query heads in 3 KV groups: TP=3 puts one KV group on each rank, so each rank
sees a third of the keys and values, and only the MAX over TP gives the one-process scale. The
model is cut to its first 2 of 30 blocks (same weights), calibrated on 2 x 64 tokens, with
FP8 and NVFP4 KV alone. Every K/V amax must equal TP=1's (rtol 1e-5: float32 reduction order
upstream) and so must the loss (rtol 2e-4, as the TP=3 calibration test explains).
"""

import pytest
import torch

from tests.distributed_utils import run_ranks

RECIPES = {f: {"name": f"kv_{f}", "rules": [], "kv_cache": {"format": f}} for f in ("fp8", "nvfp4")}
LAYERS, SEQ = 2, 64


def _run(groups, tp):
    import megaquant
    from megaquant.data import default_calib_text, default_eval_text, token_batches
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.models.mapping import hf_to_megatron
    from megaquant.models.smollm2 import load_smollm2
    from megaquant.spec import get_spec_provider

    arch_d, hf_state, tok = load_smollm2()
    arch = GPTConfig.from_dict({**arch_d, "num_layers": LAYERS, "seq_length": SEQ,
                                "name": "smollm2-2"})
    calib = [t[None, :-1] for t in token_batches(default_calib_text(), tok, 2, SEQ)]
    evals = list(token_batches(default_eval_text(), tok, 1, SEQ).split(1))
    out = {}
    for key, recipe in RECIPES.items():
        model = build_gpt_model(arch, get_spec_provider("local"), tp_size=tp)
        model.load_state_dict(hf_to_megatron(hf_state, arch, groups.tp_rank, tp), strict=False)
        megaquant.quantize(model.eval(), recipe,
                           lambda m: run_forward(m, calib, "calib", groups.dp_group),
                           dp_group=groups.dp_group)
        out[key] = {"loss": evaluate_loss(model, evals, groups.dp_group),
                    "amax": {n: q.amax.clone() for n, q in model.named_modules()
                             if n.endswith(("k_quantizer", "v_quantizer"))}}
    return out


def _tp3():
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    torch.set_num_threads(1)
    init_distributed(timeout_s=300)
    return _run(init_model_parallel(tp=3), 3)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kv_amax_tp3_on_smollm2_matches_single_process(megatron_single):
    ref = _run(megatron_single, 1)
    for rank, res in enumerate(run_ranks(_tp3, 3, (), timeout_s=840)):
        for key, want in ref.items():
            got = res[key]
            assert got["amax"].keys() == want["amax"].keys() and len(want["amax"]) == 2 * LAYERS
            for k in want["amax"]:
                torch.testing.assert_close(got["amax"][k], want["amax"][k], rtol=1e-5, atol=0,
                                           msg=f"rank {rank} {key} {k}")
            assert got["loss"] == pytest.approx(want["loss"], rel=2e-4), (rank, key)
