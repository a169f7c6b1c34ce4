"""Single-process MoE pieces: config checks, the expert sync rules, conversion of experts."""

import pytest
import torch

from megaquant.calib.sync import SyncItem, sync_all
from megaquant.formats import get_format
from megaquant.models.gpt import GPTConfig, tiny_moe_config
from megaquant.quantizer import TensorQuantizer


@pytest.mark.parametrize("changes, message", [
    ({"moe_router_topk": 5}, "moe_router_topk"),
    ({"moe_token_dispatcher": "flex"}, "moe_token_dispatcher"),
    ({"num_moe_experts": 0}, "num_moe_experts"),
    ({"moe_experts": 4}, "unknown GPTConfig keys"),
])
def test_gpt_config_moe_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_moe_config(**changes)


def test_gpt_config_expert_parallel_must_divide_experts():
    tiny_moe_config().check_expert_parallel(2)
    with pytest.raises(ValueError, match=r"one of \[1, 2, 4\], got 3"):
        tiny_moe_config().check_expert_parallel(3)
    dense = GPTConfig.from_dict({k: v for k, v in vars(tiny_moe_config()).items()
                                 if not k.startswith(("num_moe", "moe_"))})
    with pytest.raises(ValueError, match="dense"):
        dense.check_expert_parallel(2)


def _item(name, values, pool_key=None, role="input"):
    q = TensorQuantizer()
    q.configure(get_format("fp8"), "calibrate")
    for v in values:
        q.collect(torch.tensor([v, -v / 2]))
    return SyncItem(name, q, None, None, role, pool_key=pool_key)


def test_sync_expert_without_tokens_takes_layer_pool_others_keep_their_own():
    key = ("mlp.experts", "linear_fc1.input_quantizer")
    items = [_item("e0", [1.0, 3.0], key), _item("e1", [], key), _item("e2", [2.0], key),
             _item("e0.w", [7.0], None, "weight"), _item("other", [5.0], ("b", "x"))]
    amaxes, empty = sync_all(items)
    assert [float(a) for a in amaxes] == [3.0, 3.0, 2.0, 7.0, 5.0]  # max |x| per item
    assert empty == ["e1"]
    shared, empty = sync_all(items, share_expert_inputs=True)
    assert [float(a) for a in shared] == [3.0, 3.0, 3.0, 7.0, 5.0]  # weights never pooled
    assert empty == []


def test_router_stays_unquantized_and_experts_convert_in_place(megatron_single):
    import megaquant
    from megaquant.models.gpt import build_gpt_model
    from megaquant.nn.local import QuantColumnParallelLinear, QuantRowParallelLinear

    torch.manual_seed(0)
    model = build_gpt_model(tiny_moe_config(), tp_size=1, ep_size=1)  # plain Megatron linears
    tokens = torch.randint(0, 256, (2, 16))
    report = megaquant.quantize(model, "fp8", lambda m: m(tokens, None, None))
    experts = model.decoder.layers[0].mlp.experts.local_experts
    assert len(experts) == 4
    for e in experts:
        assert type(e.linear_fc1) is QuantColumnParallelLinear and e.linear_fc1.is_expert
        assert type(e.linear_fc2) is QuantRowParallelLinear
        assert e.linear_fc1.weight_quantizer.has_amax and e.linear_fc1.input_quantizer.has_amax
    assert not any("router" in n for n in report.enabled_quantizers)
    assert report.calibration["expert_inputs_without_tokens"] == []
