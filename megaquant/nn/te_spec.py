"""``QuantTESpecProvider``: Megatron's TE backend, with megaquant's quantized TE layers.

Plug it wherever Megatron takes a ``BackendSpecProvider`` (``get_mlp_module_spec_for_backend``,
``get_moe_module_spec_for_backend``, the spec helpers in :mod:`megaquant.spec`). Imported only
where TE imports.

LayerNorm + linear, the one choice that differs from ``TESpecProvider``: by default this
provider reports ``fuse_layernorm_and_linear() == False`` and offers ``TENorm`` followed by
``QuantTEColumnParallelLinear`` - the layout of Megatron's ModelOpt spec. In TE's fused
``LayerNormLinear`` the normalized activation (the GEMM input) exists only inside the fused
kernel, so an input quantizer cannot be applied there without leaving the fused path; split, every
GEMM keeps TE's fused forward and its input is an argument the quantizer can reach. Spec
builders that hard-code the fused module (Megatron's TE GPT spec asks for
``column_parallel_layer_norm_linear()`` for ``linear_qkv`` without an input norm) still get a
correct layer: :class:`~megaquant.nn.te_layers.QuantTELayerNormColumnParallelLinear`, which
takes the unfused route only when its input quantizer is on.
"""

from __future__ import annotations

from typing import Optional, Tuple

from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

from megaquant.nn.te_layers import (
    QuantTEColumnParallelGroupedLinear,
    QuantTEColumnParallelLinear,
    QuantTELayerNormColumnParallelLinear,
    QuantTELinear,
    QuantTERowParallelGroupedLinear,
    QuantTERowParallelLinear,
)


class QuantTESpecProvider(TESpecProvider):
    """TE backend whose linears are megaquant's quantized TE subclasses.

    Args:
        fuse_layernorm: offer TE's fused LayerNorm+linear (``True``) or the unfused
            ``TENorm`` + quantized column-parallel linear (``False``, default; see module doc).
    """

    def __init__(self, fuse_layernorm: bool = False):
        super().__init__()
        self.fuse_layernorm = fuse_layernorm

    def linear(self) -> type:
        return QuantTELinear

    def column_parallel_linear(self) -> type:
        return QuantTEColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return QuantTERowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return self.fuse_layernorm

    def column_parallel_layer_norm_linear(self) -> Optional[type]:
        return QuantTELayerNormColumnParallelLinear

    def grouped_mlp_modules(
        self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool
    ) -> Tuple[type, Optional[MLPSubmodules]]:
        """TE grouped GEMMs for MoE experts, else a sequential MLP of quantized TE linears."""
        if moe_use_legacy_grouped_gemm:
            raise ValueError(
                "the legacy GroupedMLP has no quantized counterpart; set "
                "moe_use_legacy_grouped_gemm=False to use TE's grouped GEMM"
            )
        if moe_use_grouped_gemm:
            return TEGroupedMLP, MLPSubmodules(
                linear_fc1=QuantTEColumnParallelGroupedLinear,
                linear_fc2=QuantTERowParallelGroupedLinear,
            )
        return SequentialMLP, MLPSubmodules(
            linear_fc1=QuantTEColumnParallelLinear, linear_fc2=QuantTERowParallelLinear
        )
