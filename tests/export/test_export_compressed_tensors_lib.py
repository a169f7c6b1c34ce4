"""The ``compressed-tensors`` library (vLLM's reader) parses our config and decompresses our
tensors.

Its ``decompress`` computes in bfloat16 (NVFP4) or the scale dtype, so the comparison with the
fake-quantized float32 weights has bfloat16 tolerance there; its float32 building blocks
(``unpack_fp4_from_uint8``, ``dequantize``) are compared at rtol 2^-22 (the reciprocal global
scale, see test_export_roundtrip.py). MX decompression is bfloat16 too, but an E4M3/E2M1 element
times a power of two is exact in bfloat16, so MX is compared bit-exactly. One export per recipe:
the tiny GPT, calibrated.
"""

import json

import pytest
import torch

from tests.export import reference_reader as R
from tests.export.export_helpers import fake_quant_hf_state, quantized_tiny

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is a dev dependency")


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8_per_channel", "int8_sq", "mxfp8", "mxfp4",
                                    "int4_w4a16"])
def test_compressed_tensors_library_decompresses_our_export(recipe, megatron_single, tmp_path):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from megaquant.export import export_model

    model, cfg = quantized_tiny(recipe, megatron_single.dp_group)
    export_model(model, cfg, tmp_path / "x", layouts=["compressed-tensors"], dtype="bfloat16")
    ref = fake_quant_hf_state(model, cfg)
    d = tmp_path / "x" / "compressed-tensors"
    qc = QuantizationConfig.model_validate(
        json.loads((d / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(qc.format)
    sd = R.load_tensors(d)
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith("weight_scale")})
    assert len(modules) == 7 * cfg.num_layers
    for m in modules:
        local = {k[len(m) + 1:]: v for k, v in sd.items() if k.startswith(m + ".")}
        assert set(compressor.compression_param_names(scheme)) <= set(local)
        w = compressor.decompress(local, scheme)["weight"]
        want = ref[f"{m}.weight"]
        assert w.shape == want.shape
        if recipe.startswith("mx"):  # bf16 inside the library, exact for element * 2^e
            assert w.dtype == torch.bfloat16 and torch.equal(w.float(), want), m
        elif recipe == "nvfp4":  # bf16 arithmetic inside the library
            torch.testing.assert_close(w.float(), want, rtol=2**-7,
                                       atol=2**-7 * want.abs().max().item())
            _check_nvfp4_float32(local, scheme, want)
        else:
            torch.testing.assert_close(w.float(), want, rtol=2**-22, atol=0)


def _check_nvfp4_float32(local, scheme, want):
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    packed = local["weight_packed"]
    vals = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    w = dequantize(x_q=vals, scale=local["weight_scale"].float(), args=scheme.weights,
                   global_scale=local["weight_global_scale"], dtype=torch.float32)
    torch.testing.assert_close(w, want, rtol=2**-22, atol=0)
