"""transformers loads our compressed-tensors exports itself and computes the fake-quant model.

Weight-only schemes only (transformers runs the weights decompressed, activations unquantized, as
the fake-quant model does; it cannot reproduce static activation quantization). The model's
parameters are made bfloat16-representable first, so the bfloat16 export is lossless, then:

* loaded in float32 (INT4, whose scales decompress to float32): logits equal the fake-quant
  model's to atol 1e-5 (other summation order), and so does the loss (perplexity);
* loaded in the export's bfloat16 (NVFP4 -- the only dtype its decompression gives -- and INT4):
  transformers computes in bfloat16, so logits agree to bfloat16 accuracy (atol 2^-6 * max
  |logit|; measured 0.26-0.42 of it, while quantization itself moves logits by over 3x it) and
  the loss to 1e-3 nats (measured ~1e-4).
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


@pytest.mark.parametrize("recipe", ["nvfp4_w4a16", "int4_w4a16"])
@torch.no_grad()
def test_transformers_loads_our_export_with_the_fake_quant_perplexity(recipe, megatron_single,
                                                                      tmp_path):
    from megaquant.evaluate import evaluate_loss
    from megaquant.export import export_model

    model, cfg = quantized_tiny(recipe, megatron_single.dp_group)
    round_params_to_bf16(model)
    export_model(model, cfg, tmp_path / "x", layouts=["compressed-tensors"], dtype="bfloat16")
    tokens = batches(1, 7)[0]
    ours = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1), None)
    loss = evaluate_loss(model, [tokens], megatron_single.dp_group)
    d = str(tmp_path / "x" / "compressed-tensors")
    dtypes = [torch.bfloat16] + ([torch.float32] if recipe == "int4_w4a16" else [])
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
    # the check can fail: the unquantized model's logits are measurably elsewhere
    for layer in model.modules():
        if hasattr(layer, "weight_quantizer"):
            layer.weight_quantizer.configure(None, "off")
    plain = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1), None)
    assert (plain - ours).abs().max().item() > 3 * 2**-6 * ours.abs().max().item()
