"""Megaquant's real TE classes on Megatron's real TE classes, over a stub TE (te_stub.py).

Run in a fresh process (``python tests/te/stub_scenarios.py VERSION...``): the stub replaces
``transformer_engine`` for the whole process. Each scenario asserts against a reference computed
with the format's ``fake_quantize``; the script exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import te_stub  # noqa: E402

VERSIONS = sys.argv[1:] or ["2.20.2"]
te_stub.install(VERSIONS[0])

import torch  # noqa: E402
from megatron.core.extensions import transformer_engine as mte  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megaquant.convert import QUANT_MODULES, apply_recipe, convert_model, register_builtins  # noqa: E402,E501
from megaquant.formats import get_format  # noqa: E402
from megaquant.nn import te_layers  # noqa: E402
from megaquant.nn.te_spec import QuantTESpecProvider  # noqa: E402
from megaquant.recipe import QuantizerConfig, Recipe, Rule  # noqa: E402

FP8 = get_format("fp8")
q = FP8.fake_quantize
CFG = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                        use_cpu_initialization=True, params_dtype=torch.float32)
KW = dict(config=CFG, init_method=lambda w: torch.nn.init.normal_(w, std=0.1),
          gather_output=False, bias=True, skip_bias_add=False, is_expert=False, tp_group=None)


def registration():
    register_builtins()  # registration is explicit (not a side effect of importing te_layers)
    for name in ("TELinear", "TEColumnParallelLinear", "TERowParallelLinear",
                 "TELayerNormColumnParallelLinear", "TEColumnParallelGroupedLinear",
                 "TERowParallelGroupedLinear"):
        assert QUANT_MODULES[getattr(mte, name)] is getattr(te_layers, "Quant" + name), name


def spec_provider():
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend

    p = QuantTESpecProvider()
    assert p.column_parallel_linear() is te_layers.QuantTEColumnParallelLinear
    assert p.row_parallel_linear() is te_layers.QuantTERowParallelLinear
    assert p.fuse_layernorm_and_linear() is False
    mlp = get_mlp_module_spec_for_backend(backend=p)
    assert mlp.submodules.linear_fc1 is te_layers.QuantTEColumnParallelLinear
    _, subs = p.grouped_mlp_modules(True, False)
    assert subs.linear_fc1 is te_layers.QuantTEColumnParallelGroupedLinear


def built_by_spec_matches_reference():
    layer = te_layers.QuantTEColumnParallelLinear(32, 64, **KW)
    layer.input_quantizer.configure(FP8, "dynamic")
    layer.weight_quantizer.configure(FP8, "dynamic")
    x = torch.randn(4, 2, 32)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, bias = layer(x)
        ref = q(x) @ q(layer.weight).t() + layer.bias
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        assert bias is None


def converted_in_place_by_convert_model():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_qkv = mte.TELayerNormColumnParallelLinear(32, 64, **KW)
            self.linear_proj = mte.TERowParallelLinear(
                64, 32, config=CFG, init_method=KW["init_method"], bias=False,
                input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_group=None)

        def forward(self, x):
            return self.linear_proj(self.linear_qkv(x)[0])[0]

    model = Block()
    w_qkv, w_proj = (model.linear_qkv.weight.detach().clone(),
                     model.linear_proj.weight.detach().clone())
    rule = Rule(modules=("*",), roles={"input": QuantizerConfig("fp8", "dynamic"),
                                       "weight": QuantizerConfig("fp8", "dynamic")})
    recipe = Recipe(name="fp8-dyn", rules=(rule,))
    report = convert_model(model, recipe)
    apply_recipe(model, recipe, report)
    assert type(model.linear_qkv) is te_layers.QuantTELayerNormColumnParallelLinear
    x = torch.randn(4, 2, 32)
    out = model(x)
    ln = torch.nn.functional.layer_norm(x, (32,), model.linear_qkv.layer_norm_weight,
                                        model.linear_qkv.layer_norm_bias, CFG.layernorm_epsilon)
    h = q(ln) @ q(w_qkv).t() + model.linear_qkv.bias
    ref = q(h) @ q(w_proj).t()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def grouped_experts_built_by_spec():
    from megatron.core.process_groups_config import ProcessGroupCollection

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=3,
                            use_cpu_initialization=True, params_dtype=torch.float32)
    pg = ProcessGroupCollection()
    pg.expt_tp = None  # no expert TP: a single process
    layer = te_layers.QuantTEColumnParallelGroupedLinear(
        3, 32, 64, config=cfg, init_method=KW["init_method"], bias=False, skip_bias_add=False,
        is_expert=True, pg_collection=pg)
    assert len(layer.weight_quantizers) == 3
    layer.input_quantizer.configure(FP8, "dynamic")
    for wq in layer.weight_quantizers:
        wq.configure(FP8, "dynamic")
    x, m_splits = torch.randn(6, 32), [1, 0, 5]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, _ = layer(x, m_splits)
        chunks = torch.split(q(x), m_splits)
        ref = torch.cat([c @ q(getattr(layer, f"weight{i}")).t() for i, c in enumerate(chunks)])
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def te_attention_kv_found_by_name():
    """Megatron's TEDotProductAttention takes the keys and values by name: the quantized
    subclass is registered and finds them where this Megatron's forward declares them."""
    register_builtins()
    quant = te_layers.QuantTEDotProductAttention
    assert QUANT_MODULES[mte.TEDotProductAttention] is quant
    assert quant.kv_positions() == {"key": 1, "value": 2}


SCENARIOS = [registration, te_attention_kv_found_by_name, grouped_experts_built_by_spec,
             spec_provider, built_by_spec_matches_reference, converted_in_place_by_convert_model]

if __name__ == "__main__":
    torch.manual_seed(0)
    for version in VERSIONS:
        te_stub.switch(version)  # the Megatron classes stay; TE's functions and protocol change
        for scenario in SCENARIOS:
            scenario()
            print(f"ok {version} {scenario.__name__}", flush=True)
