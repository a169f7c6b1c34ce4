"""Round trip: export, read back with an independent reader, compare with the fake-quant model.

Tolerances: the ModelOpt layout and the compressed-tensors FP8/INT4 layouts decode bit-exactly
to the fake-quantized weights (same float32 products: codes, E4M3 block scales and the global
scale are exact). compressed-tensors NVFP4 stores the *reciprocal* global scale 1/g and decodes
value / (1/g): two float32 roundings instead of one, so those are compared with rtol 2^-22
(about 2 ulp) after checking bit-exactly that codes, block scales and 1/g are what was claimed.
The loss of a model rebuilt from the exported tensors equals the fake-quant model's exactly.
Exports are written with ``dtype=bfloat16`` (compressed-tensors NVFP4/MX need it) from a model
whose parameters were made bfloat16-representable, so the unquantized tensors are lossless too.
"""

import json

import pytest
import torch

from tests.export import reference_reader as R
from tests.export.export_helpers import (
    batches,
    fake_quant_hf_state,
    quantized_tiny,
    round_params_to_bf16,
)

RECIPES = ["nvfp4", "nvfp4_w4a16", "fp8", "fp8_per_channel", "int8_sq", "mxfp8", "mxfp4",
           "int4_w4a16"]
# the recipes ModelOpt has a layout for, and its quant_algo
MODELOPT = {"nvfp4": "NVFP4", "nvfp4_w4a16": "W4A16_NVFP4", "fp8": "FP8",
            "int8_sq": "W8A8_SQ_PER_CHANNEL", "mxfp8": "MXFP8", "mxfp4": "mxfp4",
            "int4_w4a16": "W4A16_AWQ"}
ACT_SCALE_MAX = {"nvfp4": 6.0 * 448.0, "fp8": 448.0, "fp8_per_channel": 448.0, "int8_sq": 127.0}
HF_TO_MEGATRON = {"q_proj": "self_attention.linear_qkv", "k_proj": "self_attention.linear_qkv",
                  "v_proj": "self_attention.linear_qkv", "o_proj": "self_attention.linear_proj",
                  "gate_proj": "mlp.linear_fc1", "up_proj": "mlp.linear_fc1",
                  "down_proj": "mlp.linear_fc2"}


@pytest.fixture(scope="module")
def exports(megatron_single, tmp_path_factory):
    from megaquant.evaluate import evaluate_loss
    from megaquant.export import export_model

    out = {}
    for recipe in RECIPES:
        model, cfg = quantized_tiny(recipe, megatron_single.dp_group)
        round_params_to_bf16(model)
        d = tmp_path_factory.mktemp(recipe) / "export"
        # several shards
        report = export_model(model, cfg, d, max_shard_bytes=60_000, dtype="bfloat16")
        out[recipe] = {"dir": d, "report": report, "cfg": cfg,
                       "ref": fake_quant_hf_state(model, cfg),
                       "loss": evaluate_loss(model, batches(2, 2), megatron_single.dp_group)}
    return out


def _quantized_modules(ref: dict) -> list[str]:
    return sorted(k[:-len(".weight")] for k in ref if k.rsplit(".", 2)[-2] in HF_TO_MEGATRON)


def _read(recipe, e, layout):
    d = e["dir"] / layout
    config = json.loads((d / "config.json").read_text())
    sd = R.load_tensors(d)
    out = {}
    for m in _quantized_modules(e["ref"]):
        shape = e["ref"][f"{m}.weight"].shape
        if layout == "modelopt":
            out[m] = R.modelopt_weight(sd, m, MODELOPT[recipe], shape)
        else:
            out[m] = R.ct_weight(sd, m, config["quantization_config"]["config_groups"]["group_0"],
                                 shape)
    return config, sd, out


@pytest.mark.parametrize("recipe", RECIPES)
def test_export_dequantizes_to_the_fake_quantized_weights(exports, recipe):
    e = exports[recipe]
    layouts = ["compressed-tensors"] + (["modelopt"] if recipe in MODELOPT else [])
    assert sorted(e["report"].layouts) == sorted(layouts)
    for layout in layouts:
        config, sd, got = _read(recipe, e, layout)
        assert len(R.load_tensors(e["dir"] / layout)) == len(sd) and \
            (e["dir"] / layout / "model.safetensors.index.json").exists()
        for m, w in got.items():
            want = e["ref"][f"{m}.weight"]
            if layout == "compressed-tensors" and recipe.startswith("nvfp4"):
                torch.testing.assert_close(w, want, rtol=2**-22, atol=0, msg=m)
            else:
                assert torch.equal(w, want), (layout, m)
        # everything else is the source tensor, in the export dtype, which config.json states
        assert config["torch_dtype"] == config["dtype"] == "bfloat16" == e["report"].dtype
        for k, t in e["ref"].items():
            if k[:-len(".weight")] not in got:
                assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k].float(), t), k
        assert "lm_head.weight" in sd  # the tiny model is untied; lm_head is excluded


def test_export_compressed_tensors_nvfp4_global_scale_is_the_reciprocal(exports):
    e = exports["nvfp4"]
    ct = R.load_tensors(e["dir"] / "compressed-tensors")
    mo = R.load_tensors(e["dir"] / "modelopt")
    for m in _quantized_modules(e["ref"]):
        assert torch.equal(ct[f"{m}.weight_packed"], mo[f"{m}.weight"])
        assert torch.equal(ct[f"{m}.weight_scale"].view(torch.uint8),
                           mo[f"{m}.weight_scale"].view(torch.uint8))
        assert ct[f"{m}.weight_global_scale"].item() == 1.0 / mo[f"{m}.weight_scale_2"].item() or \
            torch.equal(ct[f"{m}.weight_global_scale"],
                        (1.0 / mo[f"{m}.weight_scale_2"]).reshape(1))
        assert torch.equal(ct[f"{m}.input_global_scale"], (1.0 / mo[f"{m}.input_scale"]).reshape(1))


def _rebuild(recipe, e, layout, megatron_single):
    """A model holding the exported (dequantized) weights and the exported activation scales."""
    from megaquant.models.gpt import build_gpt_model
    from megaquant.models.mapping import hf_to_megatron
    from megaquant.ptq import restore

    config, sd, got = _read(recipe, e, layout)
    hf = {k: v for k, v in sd.items()
          if k.endswith(".weight") and k[:-7] not in got and v.is_floating_point()}
    hf.update({f"{m}.weight": w for m, w in got.items()})
    torch.manual_seed(99)
    model = build_gpt_model(e["cfg"], tp_size=1)
    restore(model, recipe)
    model.load_state_dict(hf_to_megatron(hf, e["cfg"], 0, 1), strict=False)
    modules = dict(model.named_modules())
    for m in got:
        n, kind = m.split(".")[2], m.rsplit(".", 1)[-1]
        layer = modules[f"decoder.layers.{n}.{HF_TO_MEGATRON[kind]}"]
        layer.weight_quantizer.configure(None, "off")  # the weights are already dequantized
        if recipe in ACT_SCALE_MAX:
            key = ("input_scale" if layout == "modelopt" or recipe != "nvfp4"
                   else "input_global_scale")
            s = sd[f"{m}.{key}"].float()
            s = 1.0 / s if key == "input_global_scale" else s
            layer.input_quantizer.load_amax((s * ACT_SCALE_MAX[recipe]).reshape(()))
    return model


@pytest.mark.parametrize("recipe", RECIPES)
def test_export_reloaded_model_loss_equals_fake_quant_loss(exports, recipe, megatron_single):
    from megaquant.evaluate import evaluate_loss

    e = exports[recipe]
    for layout in e["report"].layouts:
        model = _rebuild(recipe, e, layout, megatron_single)
        loss = evaluate_loss(model, batches(2, 2), megatron_single.dp_group)
        if layout == "compressed-tensors" and recipe.startswith("nvfp4"):
            assert abs(loss - e["loss"]) < 1e-5, (layout, loss, e["loss"])  # see module docstring
        else:
            assert loss == e["loss"], (layout, loss, e["loss"])


@pytest.mark.parametrize("recipe", ["nvfp4", "int4_w4a16", "int8_sq", "mxfp8", "mxfp4"])
def test_export_report_bits_per_parameter(exports, recipe):
    e = exports[recipe]
    for layout, info in e["report"].layouts.items():
        sd = R.load_tensors(e["dir"] / layout)
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        params = sum(t.numel() for t in e["ref"].values())
        assert info["bytes"] == nbytes
        assert info["bits_per_param"] == pytest.approx(8 * nbytes / params, rel=1e-12)
        # from the format definitions: NVFP4 = 4-bit codes + an E4M3 scale per 16 + two fp32
        # scalars (weight and input global scale); INT4 = 32-bit words of eight codes (c-t) or
        # bytes of two rows (ModelOpt) + an fp32 scale per 128, + the int64 [2] weight_shape
        # (c-t) or an fp32 pre_quant_scale per input channel (ModelOpt); INT8 and MX below
        bits = params_q = 0
        for m in _quantized_modules(e["ref"]):
            out, k = e["ref"][f"{m}.weight"].shape
            params_q += out * k
            if recipe == "nvfp4":
                bits += out * k * 4 + out * -(-k // 16) * 8 + 2 * 32
            elif recipe == "int8_sq":  # int8 codes + an fp32 scale per row + the input scale
                bits += out * k * 8 + out * 32 + 32
            elif recipe.startswith("mx"):  # elements + an E8M0 byte per 32
                bits += out * k * (8 if recipe == "mxfp8" else 4) + out * (k // 32) * 8
            elif layout == "compressed-tensors":
                bits += out * -(-k // 8) * 32 + out * -(-k // 128) * 32 + 2 * 64
            else:
                bits += out * k * 4 + out * -(-k // 128) * 32 + k * 32
        assert info["quantized_bits_per_param"] == pytest.approx(bits / params_q, rel=1e-12)
    saved = json.loads((e["dir"] / "export_report.json").read_text())
    assert saved["scheme"] == {"int8_sq": "int8"}.get(recipe, recipe)
    assert saved["layouts"].keys() == e["report"].layouts.keys()


def test_every_built_in_recipe_exports_to_at_least_one_layout():
    """Each recipe's rules map to an exported scheme that a layout writes (in bfloat16)."""
    import torch

    from megaquant.export import layouts as L
    from megaquant.export.schemes import scheme_of
    from megaquant.recipe import available_recipes, load_recipe

    assert len(available_recipes()) >= 14
    for name in available_recipes():
        recipe = load_recipe(name)
        if not recipe.rules:  # the KV cache alone (kv_fp8): every layout writes its linears as is
            assert recipe.kv_cache is not None, name
            assert all(L.supports(lay, L.NO_LINEARS, torch.bfloat16) for lay in L.LAYOUTS)
        for rule in recipe.rules:
            w, i = (rule.roles.get(r) for r in ("weight", "input"))
            scheme = scheme_of(w.build_format(), i.build_format() if i else None)
            assert scheme is not None and all(c.mode == "static" for c in (w, i) if c), name
            assert any(L.supports(lay, scheme, torch.bfloat16) for lay in L.LAYOUTS), name


def test_export_report_marks_approximate_activations(exports):
    """DECISIONS "Activation scale rules": what engines compute differently is in the report."""
    notes = {r: {lay: " ".join(v["notes"]) for lay, v in e["report"].layouts.items()}
             for r, e in exports.items()}
    for recipe in ("nvfp4", "nvfp4_w4a16", "fp8", "fp8_per_channel", "int4_w4a16"):
        assert not any(notes[recipe].values()), (recipe, notes[recipe])
    for layout in ("modelopt", "compressed-tensors"):
        assert "clamp" in notes["int8_sq"][layout] and "[-128, 127]" in notes["int8_sq"][layout]
        for recipe in ("mxfp8", "mxfp4"):  # OCP scale rule: no engine uses it for activations
            assert ("activations approximate" in notes[recipe][layout]
                    and "'ocp'" in notes[recipe][layout])
    assert "no engine maps it" in notes["mxfp4"]["modelopt"]
