"""transformers loads our compressed-tensors exports itself and computes the fake-quant model.

Weight-only schemes, and the static-activation W8A8 schemes: transformers' compressed-tensors
integration quantizes activations with the exported static scales (quantize-dequantize), so FP8
and INT8 exports reproduce the fake-quant model too -- on activations within the calibrated range
(the calibration batches here): beyond it engines clamp INT8 codes at -128 where megaquant's
symmetric INT8 clamps at -127. The model's parameters are made bfloat16-representable first, so
the bfloat16 export is lossless, then:

* loaded in float32 (INT4, FP8, INT8, whose scales decompress to float32): logits equal the
  fake-quant model's to atol 1e-5 (other summation order; measured 0), and so does the loss;
* loaded in the export's bfloat16 (weight-only: NVFP4 -- the only dtype its decompression
  gives -- and INT4): transformers computes in bfloat16, so logits agree to bfloat16 accuracy
  (atol 2^-6 * max |logit|; measured 0.26-0.42 of it, while quantization itself moves logits by
  over 3x it) and the loss to 1e-3 nats (measured ~1e-4).
"""

import pytest
import torch

from tests.export.export_helpers import batches, quantized_tiny, round_params_to_bf16

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def _hf_loss(hf, tokens) -> tuple[torch.Tensor, float]:
    logits = hf(tokens[:, :-1]).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            tokens[:, 1:].reshape(-1))
    return logits, nll.item()


@pytest.mark.parametrize("recipe", ["nvfp4_w4a16", "int4_w4a16", "int8_sq", "fp8"])
@torch.no_grad()
def test_transformers_loads_our_export_with_the_fake_quant_perplexity(recipe, megatron_single,
                                                                      tmp_path):
    from megaquant.evaluate import evaluate_loss
    from megaquant.export import export_model

    model, cfg = quantized_tiny(recipe, megatron_single.dp_group)
    round_params_to_bf16(model)
    export_model(model, cfg, tmp_path / "x", layouts=["compressed-tensors"], dtype="bfloat16")
    tokens = batches(3, 1)[0]  # quantized_tiny's first calibration batch: activations in range
    ours = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1),
                 None)
    loss = evaluate_loss(model, [tokens], megatron_single.dp_group)
    d = str(tmp_path / "x" / "compressed-tensors")
    # W8A8 in bfloat16: one bfloat16 rounding can move an activation to the next code (a whole
    # quantization step), so those are compared in float32 only
    dtypes = ([torch.bfloat16] if recipe.endswith("w4a16") else []) + \
        ([torch.float32] if recipe != "nvfp4_w4a16" else [])
    for dtype in dtypes:
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
        assert hf.config.dtype == dtype
        logits, hf_loss = _hf_loss(hf, tokens)
        if dtype == torch.float32:
            torch.testing.assert_close(logits, ours, rtol=0, atol=1e-5)
            assert abs(hf_loss - loss) < 1e-5, (hf_loss, loss)
        else:
            atol = 2**-6 * ours.abs().max().item()
            torch.testing.assert_close(logits, ours, rtol=0, atol=atol)
            assert abs(hf_loss - loss) < 1e-3, (hf_loss, loss)  # measured: ~1e-4
    # the checks can fail: the unquantized model's logits are measurably elsewhere
    for layer in model.modules():
        for role in ("weight_quantizer", "input_quantizer"):
            if hasattr(layer, role):
                getattr(layer, role).configure(None, "off")
    plain = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1),
                  None)
    tightest = 1e-5 if torch.float32 in dtypes else 2**-6 * ours.abs().max().item()
    assert (plain - ours).abs().max().item() > 3 * tightest


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", ["nvfp4_w4a16"])
@torch.no_grad()
def test_transformers_reproduces_smollm2_perplexity_from_our_export(recipe, megatron_single,
                                                                    tmp_path):
    """The user's path: SmolLM2 quantized, exported with dtype=auto (bfloat16, its training
    dtype) and loaded by transformers: perplexity within 1% of the fake-quant model's (bfloat16
    arithmetic in transformers, float32 in ours), far from the unquantized model's."""
    import megaquant
    from megaquant.data import default_calib_text, default_eval_text, token_batches
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.export import export_model
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.models.mapping import hf_to_megatron
    from megaquant.models.smollm2 import load_smollm2

    arch_d, hf_state, tok = load_smollm2()
    arch = GPTConfig.from_dict({**arch_d, "seq_length": 256, "name": "SmolLM2-135M"})
    model = build_gpt_model(arch, tp_size=1)
    model.load_state_dict(hf_to_megatron(hf_state, arch, 0, 1), strict=False)
    round_params_to_bf16(model)
    evals = list(token_batches(default_eval_text(), tok, 2, 256).split(1))
    loss_fp = evaluate_loss(model, evals, megatron_single.dp_group)
    calib = [t[None, :-1] for t in token_batches(default_calib_text(), tok, 1, 256)]
    megaquant.quantize(model, recipe,
                       lambda m: run_forward(m, calib, "calib", megatron_single.dp_group),
                       dp_group=megatron_single.dp_group)
    loss_q = evaluate_loss(model, evals, megatron_single.dp_group)
    report = export_model(model, arch, tmp_path / "x", tokenizer=tok, source_dtype="bfloat16")
    assert report.dtype == "bfloat16" and "compressed-tensors" in report.layouts
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "x" / "compressed-tensors")).eval()
    assert hf.config.dtype == torch.bfloat16
    nll = sum(_hf_loss(hf, t)[1] for t in evals) / len(evals)
    ppl_hf, ppl_q, ppl_fp = (torch.tensor([nll, loss_q, loss_fp]).exp()).tolist()
    print(f"SmolLM2 {recipe}: transformers ppl {ppl_hf:.3f}, fake-quant {ppl_q:.3f}, "
          f"fp {ppl_fp:.3f}, "
          f"{report.layouts['compressed-tensors']['bits_per_param']:.2f} bits/param")
    assert abs(ppl_hf / ppl_q - 1) < 0.01, (ppl_hf, ppl_q)
    assert abs(ppl_q / ppl_fp - 1) > 0.03  # quantization is visible: the check can fail
