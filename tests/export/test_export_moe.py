"""MoE export (Qwen2-MoE layout): every expert under its global index, routers in source precision.

The tiny MoE (2 layers x 4 experts, top-2) gets distinct weights per expert
(``tests.moe.moe_helpers.full_moe_state``), so a swapped or duplicated expert cannot pass.
Tolerances as in test_export_roundtrip.py: bit-exact except compressed-tensors NVFP4 (rtol 2^-22,
its reciprocal global scale). The transformers check compares logits of HF's own
``Qwen2MoeForCausalLM`` built from our config.json and the dequantized tensors with the
fake-quantized Megatron model (weight-only scheme): atol 1e-5 on logits of magnitude ~1 (float32,
other summation order).
"""

import json

import pytest
import torch

from tests.export import reference_reader as R
from tests.export.export_helpers import fake_quant_hf_state, round_params_to_bf16

RECIPES = ["nvfp4", "fp8_per_channel"]
MODELOPT = {"nvfp4": "NVFP4"}
EXPERTS, LAYERS = 4, 2


def quantized_tiny_moe(recipe: str, dp_group, **changes):
    """(calibrated tiny MoE at TP=1, EP=1 with distinct expert weights, its GPTConfig)."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import build_gpt_model, tiny_moe_config
    from tests.moe.moe_helpers import batches, full_moe_state

    cfg = tiny_moe_config(**changes)
    model = build_gpt_model(cfg, tp_size=1, ep_size=1)
    model.load_state_dict(full_moe_state(cfg), strict=False)
    calib = [b[:, :-1] for b in batches(4, 1)]
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", dp_group),
                       dp_group=dp_group)
    return model, cfg


@pytest.fixture(scope="module")
def moe_exports(megatron_single, tmp_path_factory):
    from megaquant.export import export_model

    out = {}
    for recipe in RECIPES:
        model, cfg = quantized_tiny_moe(recipe, megatron_single.dp_group)
        round_params_to_bf16(model)  # bfloat16 export (c-t NVFP4 needs it), lossless
        d = tmp_path_factory.mktemp(f"moe_{recipe}") / "export"
        out[recipe] = {"dir": d, "report": export_model(model, cfg, d, dtype="bfloat16"),
                       "cfg": cfg,
                       "ref": fake_quant_hf_state(model, cfg), "model": model}
    return out


def _expert_modules(layer: int) -> list[str]:
    return [f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(EXPERTS)
            for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("recipe", RECIPES)
def test_export_moe_every_expert_dequantizes_to_the_fake_quantized_weights(moe_exports, recipe):
    e = moe_exports[recipe]
    for layout in ["compressed-tensors"] + (["modelopt"] if recipe in MODELOPT else []):
        d = e["dir"] / layout
        sd, config = R.load_tensors(d), json.loads((d / "config.json").read_text())
        group = config["quantization_config"].get("config_groups", {}).get("group_0")
        for layer in range(LAYERS):
            found = {k.split(".")[5] for k in sd
                     if k.startswith(f"model.layers.{layer}.mlp.experts.")}
            assert found == {str(i) for i in range(EXPERTS)}, (layout, layer, found)
            for m in _expert_modules(layer):
                want = e["ref"][f"{m}.weight"]
                got = (R.modelopt_weight(sd, m, MODELOPT[recipe], want.shape)
                       if layout == "modelopt"
                       else R.ct_weight(sd, m, group, want.shape))
                if layout == "compressed-tensors" and recipe == "nvfp4":
                    torch.testing.assert_close(got, want, rtol=2**-22, atol=0, msg=m)
                else:
                    assert torch.equal(got, want), (layout, m)
            # the router: the export dtype, the source tensor, and declared unquantized
            router = f"model.layers.{layer}.mlp.gate"
            src = e["model"].decoder.layers[layer].mlp.router.weight.detach()
            assert sd[f"{router}.weight"].dtype == torch.bfloat16
            assert torch.equal(sd[f"{router}.weight"].float(), src)
            assert not any(k.startswith(f"{router}.") and not k.endswith(".weight") for k in sd)
            ignored = (config["quantization_config"]["ignore"] if layout == "compressed-tensors"
                       else config["quantization_config"]["exclude_modules"])
            assert router in ignored
        # experts are distinct: a mix-up would have shown above, make sure the data can tell
        assert not torch.equal(e["ref"]["model.layers.0.mlp.experts.0.down_proj.weight"],
                               e["ref"]["model.layers.0.mlp.experts.1.down_proj.weight"])


def test_export_moe_config_is_qwen2_moe(moe_exports):
    e = moe_exports["nvfp4"]
    for layout in ("modelopt", "compressed-tensors"):
        config = json.loads((e["dir"] / layout / "config.json").read_text())
        assert config["architectures"] == ["Qwen2MoeForCausalLM"]
        assert config["model_type"] == "qwen2_moe"
        assert (config["num_experts"], config["num_experts_per_tok"],
                config["moe_intermediate_size"],
                config["shared_expert_intermediate_size"]) == (EXPERTS, 2, 64, 0)
        assert config["norm_topk_prob"] is True and config["qkv_bias"] is False
    hf_quant = json.loads((e["dir"] / "modelopt" / "hf_quant_config.json").read_text())
    assert {f"model.layers.{n}.mlp.gate" for n in range(LAYERS)} <= set(
        hf_quant["quantization"]["exclude_modules"])
    assert hf_quant["quantization"]["kv_cache_quant_algo"] is None


def test_export_moe_loads_in_transformers_with_the_same_logits(megatron_single, tmp_path):
    """HF's Qwen2MoeForCausalLM, from our config.json and dequantized tensors, computes our
    logits."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from megaquant.export import export_model
    from tests.moe.moe_helpers import batches

    model, cfg = quantized_tiny_moe("nvfp4_w4a16", megatron_single.dp_group)  # weight-only
    round_params_to_bf16(model)  # compressed-tensors NVFP4 is written in bfloat16 only: lossless
    export_model(model, cfg, tmp_path / "x", layouts=["compressed-tensors"], dtype="bfloat16")
    d = tmp_path / "x" / "compressed-tensors"
    sd, config = R.load_tensors(d), json.loads((d / "config.json").read_text())
    group = config.pop("quantization_config")["config_groups"]["group_0"]
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_packed")})
    plain = {k: v for k, v in sd.items() if k.endswith(".weight")}
    for m in modules:
        shape = (sd[f"{m}.weight_scale"].shape[0], sd[f"{m}.weight_packed"].shape[1] * 2)
        plain[f"{m}.weight"] = R.ct_weight(sd, m, group, shape)
    (tmp_path / "hf").mkdir()
    save_file(plain, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, dtype=torch.float32)
    # only Qwen2-MoE's shared expert is absent: shared_expert_intermediate_size 0 (empty tensors)
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert all(".shared_expert" in k for k in info["missing_keys"]), info["missing_keys"]
    tokens = batches(1, 5)[0][:, :-1]
    with torch.no_grad():
        ours = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_export_moe_refuses_ungated_shared_experts(megatron_single, tmp_path):
    from megaquant.export import export_model

    model, cfg = quantized_tiny_moe("fp8", megatron_single.dp_group,
                                    moe_shared_expert_intermediate_size=32)
    with pytest.raises(ValueError, match="ungated shared expert.*sigmoid"):
        export_model(model, cfg, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_moe_mapping_round_trips_over_tp_and_matches_the_model(megatron_single):
    """hf_to_megatron / megatron_to_hf for MoE layers: exact inverses at TP=2, the model's keys."""
    from megaquant.models.gpt import build_gpt_model, tiny_moe_config
    from megaquant.models.mapping import hf_to_megatron, megatron_to_hf

    cfg = tiny_moe_config()
    model_state = {k: v for k, v in build_gpt_model(cfg, tp_size=1, ep_size=1).state_dict().items()
                   if not k.endswith("_extra_state")}
    g = torch.Generator().manual_seed(3)
    hf = {k: torch.randn(v.shape, generator=g)
          for k, v in megatron_to_hf([model_state], cfg).items()}
    assert sum(".mlp.experts." in k for k in hf) == LAYERS * EXPERTS * 3
    one = hf_to_megatron(hf, cfg, 0, 1)
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in model_state.items()}
    back = megatron_to_hf([hf_to_megatron(hf, cfg, r, 2) for r in range(2)], cfg)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
