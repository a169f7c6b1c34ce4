"""Real TE on a GPU: a quantized TE layer against the quantized local layer on the same weights.

Skipped unless Transformer Engine and CUDA are importable (never on the CPU CI). Both layers get
the same weights and dynamic FP8 fake-quant on input and weight, so they compute the same math;
the only difference is whose GEMM runs it (TE's cuBLAS call vs torch's), hence a float32
tolerance rather than bit-exactness. Gradients are compared too (QAT through TE's backward).
"""

from __future__ import annotations

import os

import pytest
import torch


def _te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE (RuntimeError) also means "skip here"
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _te_available(), reason="needs Transformer Engine and CUDA"),
]


@pytest.fixture(scope="module")
def tp1():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("nccl", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    parallel_state.destroy_model_parallel()


def _config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             params_dtype=torch.float32, use_cpu_initialization=True)


def _fp8_on(layer, roles=("input", "weight")):
    from megaquant.formats import get_format
    from megaquant.quantizer import TensorQuantizer

    for role in roles:
        setattr(layer, f"{role}_quantizer", TensorQuantizer(get_format("fp8"), mode="dynamic"))
    return layer.cuda()


def _init(w):
    return torch.nn.init.normal_(w, std=0.05)


def test_quant_te_column_parallel_matches_quant_local(tp1):
    from megaquant.nn.local import QuantColumnParallelLinear
    from megaquant.nn.te_layers import QuantTEColumnParallelLinear

    kw = dict(config=_config(), init_method=_init, gather_output=False, bias=True,
              skip_bias_add=False)
    te_layer = _fp8_on(QuantTEColumnParallelLinear(64, 128, is_expert=False, **kw))
    local = _fp8_on(QuantColumnParallelLinear(64, 128, **kw))
    with torch.no_grad():
        local.weight.copy_(te_layer.weight)
        local.bias.copy_(te_layer.bias)
    x = torch.randn(8, 2, 64, device="cuda")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_te, _ = te_layer(x1)
    out_local, _ = local(x2)
    torch.testing.assert_close(out_te, out_local, atol=1e-4, rtol=1e-4)
    out_te.square().sum().backward()
    out_local.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(te_layer.weight.grad, local.weight.grad, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # the forward(None, ...) path
        torch.testing.assert_close(te_layer(x)[0], local(x)[0], atol=1e-4, rtol=1e-4)


def test_quant_te_layernorm_linear_routes_agree_with_norm_plus_local(tp1):
    from megatron.core.extensions.transformer_engine import TENorm

    from megaquant.nn.local import QuantColumnParallelLinear
    from megaquant.nn.te_layers import QuantTELayerNormColumnParallelLinear

    cfg = _config()
    kw = dict(config=cfg, init_method=_init, gather_output=False, bias=True, skip_bias_add=False)
    fused = _fp8_on(QuantTELayerNormColumnParallelLinear(64, 128, is_expert=False, **kw))
    norm = TENorm(cfg, 64).cuda()
    local = _fp8_on(QuantColumnParallelLinear(64, 128, **kw))
    with torch.no_grad():
        local.weight.copy_(fused.weight)
        local.bias.copy_(fused.bias)
        norm.weight.copy_(fused.layer_norm_weight)
        norm.bias.copy_(fused.layer_norm_bias)
    x = torch.randn(8, 2, 64, device="cuda")
    with torch.no_grad():
        ref, _ = local(norm(x))
        got, _ = fused(x)  # input quantizer on: the unfused route
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
        fused.input_quantizer.mode = "off"  # weight only: TE's fused route
        local.input_quantizer.mode = "off"
        ref_w, _ = local(norm(x))
        torch.testing.assert_close(fused(x)[0], ref_w, atol=1e-4, rtol=1e-4)
