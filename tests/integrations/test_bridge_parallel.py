"""The Bridge pre-wrap hook on megaquant's GPT chunks at TP=2 and EP=2 (gloo, two ranks).

On each rank the hooked model (weights brought in by an earlier hook, as AutoBridge does) must
equal ``megaquant.quantize`` run directly on the same shard with the same process groups: amax
bit-identical, same loss. A checkpoint saved from the hooked model then loads into a second
hooked model (``init_from``) with the same amax and loss, and Bridge's PTQ flow
(``quantize_and_save``, recipe record written by rank 0) restores the same way into a QAT model.
"""

import pytest
import torch

from tests.distributed_utils import run_ranks


def _cfg(moe: bool):
    from megaquant.models.gpt import tiny_gpt_config, tiny_moe_config

    return tiny_moe_config() if moe else tiny_gpt_config()


def _worker(tp, ep, full, ckpt):
    import megaquant
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.integrations.bridge import attach
    from megaquant.integrations.bridge_ptq import quantize_and_save
    from megaquant.integrations.nemo import recipe_dict, unwrap
    from megaquant.megatron.checkpoint import load_checkpoint, save_checkpoint
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model
    from tests.integrations.bridge_doubles import ProviderDouble
    from tests.moe.moe_helpers import batches, global_amax, load_sharded

    init_distributed(timeout_s=150)
    g = init_model_parallel(tp=tp, ep=ep)
    cfg = _cfg(ep > 1)
    local = (cfg.num_moe_experts or ep) // ep
    calib = [b[:, :-1] for b in batches(2, 1)]  # the same count on every DP rank (EP=2: DP=2)

    def build():
        return [build_gpt_model(cfg, tp_size=tp, ep_size=ep)]

    def weights(model):
        for chunk in model:
            load_sharded(chunk, full, g.tp_rank, tp, g.ep_rank, local)
        return model

    def loop(m):
        run_forward(m, calib, "calib", g.dp_group)

    def summary(model):
        return {"amax": global_amax(model, g.ep_rank, local),
                "loss": evaluate_loss(model, batches(2, 2), g.dp_group)}  # one per DP rank

    ref = weights(build())[0]
    megaquant.quantize(ref, "fp8_per_channel", loop, dp_group=g.dp_group)
    provider = ProviderDouble(build)
    provider.register_pre_wrap_hook(weights)
    attach(provider, "fp8_per_channel", forward_loop=loop, dp_group=lambda: g.dp_group)
    hooked = unwrap(provider.provide_distributed_model(wrap_with_ddp=False)[0])
    save_checkpoint(hooked, ckpt, metadata={"kind": "ptq",
                                            "recipe_config": recipe_dict("fp8_per_channel")})
    again = ProviderDouble(build)  # fresh random weights: all must come from the checkpoint
    attach(again, "fp8_per_channel", init_from=ckpt)
    restored = unwrap(again.provide_distributed_model(wrap_with_ddp=False)[0])
    # Bridge's PTQ flow; megaquant's writer stands for save_megatron_model (both save the
    # sharded_state_dict), then Bridge's own load fills the amax the hook primed.
    ptq = ProviderDouble(build)
    ptq.register_pre_wrap_hook(weights)
    saved = quantize_and_save(ptq, "fp8_per_channel", loop, f"{ckpt}_bridge",
                              dp_group=g.dp_group, save=lambda model, path: save_checkpoint(
                                  unwrap(model[0]), path, metadata={}))
    qat = ProviderDouble(build)
    attach(qat, "fp8_per_channel", init_from=f"{ckpt}_bridge")
    trained = unwrap(qat.provide_distributed_model(ddp_config=object())[0])
    load_checkpoint(trained, f"{ckpt}_bridge")
    return {"ref": summary(ref), "hooked": summary(hooked), "restored": summary(restored),
            "ptq": summary(unwrap(saved[0])), "qat": summary(trained)}


def _check(per_rank):
    for rank, res in enumerate(per_rank):
        want = res["ref"]
        assert want["amax"]
        for case in ("hooked", "restored", "ptq", "qat"):
            got = res[case]
            assert got["amax"].keys() == want["amax"].keys(), (rank, case)
            for k, v in want["amax"].items():
                assert torch.equal(got["amax"][k], v), (rank, case, k)
            assert got["loss"] == want["loss"], (rank, case)


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("tp,ep", [pytest.param(2, 1, id="tp2"),  # ~15 s: the default one
                                   pytest.param(1, 2, id="ep2", marks=pytest.mark.slow)])  # ~35 s
def test_bridge_hook_on_parallel_chunks_matches_quantize(megatron_single, tmp_path, tp, ep):
    from tests.moe.moe_helpers import full_moe_state

    full = full_moe_state(_cfg(ep > 1))
    _check(run_ranks(_worker, 2, (tp, ep, full, str(tmp_path / "ckpt")), timeout_s=360))
