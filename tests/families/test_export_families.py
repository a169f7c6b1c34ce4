"""Import -> quantize -> export of each family, read back by transformers (compressed-tensors).

For every family the export must come out as the *same* Hugging Face architecture (in both
layouts: the ModelOpt config.json equals the compressed-tensors one but for
quantization_config), and transformers must reproduce the fake-quantized Megatron model's logits:

* dense families, loaded by transformers with its compressed-tensors integration (quantized
  linears stay compressed-tensors modules that fake-quantize activations themselves):
  (Weights are rounded to bfloat16 first and the export writes unquantized tensors in
  bfloat16, the dtype compressed-tensors needs for NVFP4, so float32 comparisons stay exact.)
  - fp8 (W8A8, static per-tensor scales): logits equal ours to 1e-5 of the largest logit --
    FP8 weights decompress exactly in float32, and the activation scales are ours.
  - nvfp4 (W4A4): compressed-tensors decompresses NVFP4 weights in bfloat16. We check those
    weights equal our fake-quantized ones to bfloat16 precision (2^-8 relative), then put the
    float32 values the codes decode to in their place, and compare logits at 1e-4 of the largest
    logit: what remains is compressed-tensors' own activation quantization (dynamic E4M3 block
    scales under our calibrated global scale) against ours. With the bfloat16 weights, W4A4
    logits move by up to ~0.7 of ~3 on this 2-layer model: a weight difference of 2^-9 flips a
    few activation codes downstream, so comparing them would only measure that.
* MoE families: transformers 5 fuses every layer's experts into 3-D tensors and has no
  compressed-tensors path for them (loading a quantized export leaves the expert weights
  unconverted), so the export is decompressed with compressed-tensors' library functions in
  float32 and loaded as a float checkpoint under the exported config.json; it must reproduce
  our model with activation quantization off (weights fake-quantized) to 1e-5 of the largest
  logit.
"""

import json

import pytest
import torch

from tests.families.families import save_family

transformers = pytest.importorskip("transformers")
SEQ = 16
ARCHS = {"llama3": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
         "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _tokens(seed=0, n=2):
    return torch.randint(0, 256, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def quantized_family(family, recipe, directory, dp_group):
    """(our model at TP=1 quantized and calibrated, its GPTConfig) from a saved HF family."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.models.hf import read_hf_model
    from megaquant.models.mapping import hf_to_megatron

    save_family(family, directory)
    cfg, state = read_hf_model(directory)
    # bf16-representable weights: the export writes unquantized tensors in bfloat16 (the dtype
    # compressed-tensors decompresses NVFP4 to), so the float32 model we compare is exactly that
    state = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in state.items()}
    arch = GPTConfig.from_dict({**cfg, "seq_length": SEQ})
    model = build_gpt_model(arch, tp_size=1)
    model.load_state_dict(hf_to_megatron(state, arch, 0, 1), strict=False)
    calib = [_tokens(seed) for seed in (1, 2, 3)]
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", dp_group),
                       dp_group=dp_group)
    return model.eval(), arch


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(SEQ)[None].expand_as(tokens), None)


def close(got, want, rel, what):
    tol = rel * want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol,
                               msg=lambda m: f"{what}: {m}")


def _export(model, arch, out):
    from megaquant.export import export_model

    export_model(model, arch, out, layouts=["compressed-tensors", "modelopt"], dtype="bfloat16")
    d = out / "compressed-tensors"
    config = json.loads((d / "config.json").read_text())
    modelopt = json.loads((out / "modelopt" / "config.json").read_text())
    same = {k: v for k, v in modelopt.items() if k != "quantization_config"}
    assert same == {k: v for k, v in config.items() if k != "quantization_config"}  # both layouts
    return d, config


@pytest.mark.parametrize("family", ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_dense_export_reproduced_by_transformers(megatron_single, tmp_path, family, recipe):
    from tests.export.export_helpers import fake_quant_hf_state

    model, arch = quantized_family(family, recipe, tmp_path / "src", megatron_single.dp_group)
    d, config = _export(model, arch, tmp_path / "x")
    assert config["architectures"] == [ARCHS[family]]
    lm_head = json.loads((tmp_path / "x" / "export_report.json").read_text())["lm_head"]
    assert lm_head.startswith(
        "tied" if family == "llama_tied" else "untied, kept in bfloat16"), lm_head
    assert "lm_head" in config["quantization_config"]["ignore"]  # engines keep it unquantized
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info.values()), info
    assert type(hf).__name__ == ARCHS[family]
    tokens, ours = _tokens(), our_logits(model, _tokens())
    if recipe == "nvfp4":
        _decompress_nvfp4_in_float32(hf, fake_quant_hf_state(model, arch), tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits
    close(theirs, ours, 1e-5 if recipe == "fp8" else 1e-4, f"{family} {recipe}")


def _decompress_nvfp4_in_float32(hf, ref: dict, tokens) -> None:
    """Let compressed-tensors decompress (bf16) at the first forward, check the weights against
    ours at bf16 precision, then install the float32 values (see the module docstring)."""
    try:
        with torch.no_grad():
            hf(tokens)
    except RuntimeError as err:  # float32 activations meet the bf16 decompressed weights
        assert "dtype" in str(err), err
    linears = {n: m for n, m in hf.named_modules() if hasattr(m, "quantization_scheme")}
    assert linears and all(f"{n}.weight" in ref for n in linears), sorted(linears)[:3]
    for name, m in linears.items():
        want = ref[f"{name}.weight"]
        close(m.weight.data, want, 2**-8, name)
        m.weight.data = want.clone()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_moe_export_reproduced_by_transformers(megatron_single, tmp_path, family, recipe):
    from safetensors.torch import save_file

    model, arch = quantized_family(family, recipe, tmp_path / "src", megatron_single.dp_group)
    d, config = _export(model, arch, tmp_path / "x")
    assert config["architectures"] == [ARCHS[family]]
    plain = decompress_with_compressed_tensors(d, config.pop("quantization_config"))
    (tmp_path / "hf").mkdir()
    save_file(plain, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    for m in model.modules():  # weights fake-quantized, activations not (see module docstring)
        if getattr(m, "input_quantizer", None) is not None:
            m.input_quantizer.mode = "off"
    with torch.no_grad():
        theirs = hf(_tokens()).logits
    close(theirs, our_logits(model, _tokens()), 1e-5, f"{family} {recipe}")


def decompress_with_compressed_tensors(d, qc: dict) -> dict:
    """Float32 weights of every quantized module, decoded by compressed-tensors' functions."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from tests.export.reference_reader import load_tensors

    config = QuantizationConfig.model_validate(qc)
    scheme = config.config_groups["group_0"]
    sd = load_tensors(d)
    out = {k: v for k, v in sd.items() if k.endswith((".weight", ".bias"))}
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")})
    assert modules
    for m in modules:
        local = {k[len(m) + 1:]: v for k, v in sd.items() if k.startswith(m + ".")}
        if "weight_packed" in local:  # NVFP4: the library's float32 building blocks
            p = local["weight_packed"]
            vals = unpack_fp4_from_uint8(p, p.shape[0], p.shape[1] * 2, dtype=torch.float32)
            w = dequantize(x_q=vals, scale=local["weight_scale"].float(), args=scheme.weights,
                           global_scale=local["weight_global_scale"], dtype=torch.float32)
        else:
            w = BaseCompressor.load_from_registry(config.format).decompress(local, scheme)["weight"]
        out[f"{m}.weight"] = w.float().contiguous()
    return out
