"""The CPU runtime behind Megatron's extension point: ``CPUSpecProvider`` and ``cpu_runtime``."""

import pytest
import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megaquant.megatron.cpu.attention import SDPAttention
from megaquant.megatron.cpu.device import cpu_runtime, cpu_runtime_enabled, disable_cpu_runtime
from megaquant.megatron.cpu.moe import CPUMoELayer, CPUTopKRouter
from megaquant.megatron.cpu.norm import TorchNorm
from megaquant.megatron.cpu.spec import CPUSpecProvider, for_this_machine
from megaquant.models.gpt import build_gpt_model, tiny_moe_config
from megaquant.nn.local import QuantColumnParallelLinear, QuantRowParallelLinear
from megaquant.spec import QuantLocalSpecProvider

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime's choices")


def test_cpu_spec_provider_answers_attention_norm_moe_and_keeps_inner_linears():
    local = LocalSpecProvider()
    assert local.layer_norm(rms_norm=True) is WrappedTorchNorm  # what the CPU runtime replaces
    p = for_this_machine(QuantLocalSpecProvider())
    assert isinstance(p, CPUSpecProvider) and for_this_machine(p) is p
    assert p.core_attention() is SDPAttention and p.layer_norm(rms_norm=True) is TorchNorm
    assert p.moe_layer() is CPUMoELayer and p.moe_router() is CPUTopKRouter
    assert p.column_parallel_linear() is QuantColumnParallelLinear
    assert p.row_parallel_linear() is QuantRowParallelLinear
    assert p.fuse_layernorm_and_linear() is local.fuse_layernorm_and_linear()
    assert p.activation_func() is local.activation_func()


def test_cpu_spec_provider_builds_the_cpu_model(megatron_single):
    model = build_gpt_model(tiny_moe_config(num_layers=1), QuantLocalSpecProvider())
    layer = model.decoder.layers[0]
    assert type(layer.self_attention.core_attention) is SDPAttention
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    assert type(layer.mlp) is CPUMoELayer and type(layer.mlp.router) is CPUTopKRouter
    assert type(layer.self_attention.linear_qkv) is QuantColumnParallelLinear


def test_cpu_runtime_context_restores_the_previous_state():
    from megatron.core.tensor_parallel import random as mcore_random

    saved = (torch.cuda.current_device, mcore_random._CUDA_RNG_STATE_TRACKER,
             mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    disable_cpu_runtime()
    try:
        with cpu_runtime() as on:
            assert on and cpu_runtime_enabled()
            assert torch.cuda.current_device() == torch.device("cpu")
        assert not cpu_runtime_enabled()
    finally:  # leave the session's runtime (and its seeded RNG streams) as they were
        (torch.cuda.current_device, mcore_random._CUDA_RNG_STATE_TRACKER,
         mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED) = saved
