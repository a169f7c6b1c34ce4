"""Compatibility shim (one release): the CPU runtime is the package :mod:`megaquant.megatron.cpu`,
split by concept (attention, norm, rng, device, moe, spec)."""

from megaquant.megatron.cpu.attention import SDPAttention  # noqa: F401
from megaquant.megatron.cpu.device import (  # noqa: F401
    cpu_checkpoint_stand_ins,
    cpu_runtime,
    cpu_runtime_enabled,
    disable_cpu_runtime,
    enable_cpu_runtime,
)
from megaquant.megatron.cpu.moe import (  # noqa: F401
    CPUAlltoAllTokenDispatcher,
    CPUMoELayer,
    CPUTopKRouter,
    _UnevenAllGather,
    _UnevenReduceScatter,
)
from megaquant.megatron.cpu.norm import TorchNorm  # noqa: F401
from megaquant.megatron.cpu.rng import (  # noqa: F401
    CPURNGStatesTracker,
    cpu_model_parallel_manual_seed,
    install_cpu_rng_tracker,
)
from megaquant.megatron.cpu.spec import CPUSpecProvider  # noqa: F401
