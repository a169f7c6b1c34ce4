"""The behaviour of megaquant's quantized TE layers, as mixins that need no TE to import.

(This module was ``megaquant.te.layers``; it sits beside the layers it serves, above ``te/``,
which only introspects and patches TE.)

:mod:`megaquant.nn.te_layers` combines these with Megatron's TE classes
(``class QuantTELinear(QuantTELinearMixin, TELinear)``); the tests combine them with TE-shaped
doubles. Each forward runs the parent's forward, i.e. TE's fused path, while TE's autograd
function is routed through :class:`~megaquant.te.wrapper.QuantizedTEFunction`. With every
quantizer off nothing is patched at all.

Where each quantizer acts, and the tensor-parallel consequences:

* ``input_quantizer`` sees the argument TE's function receives: under sequence parallelism a
  column-parallel layer's local sequence shard (TE gathers inside the function). Quantizing the
  shard equals quantizing the gathered tensor when the per-tensor amax is synced over TP
  (megaquant.calib.sync) and blocks run along the hidden dim, which SP does not split.
* ``weight_quantizer(s)`` see this rank's weight shard.
* ``output_quantizer`` sees the layer's output. Unlike the local ``RowParallelLinear`` (where it
  sees the partial sum), TE reduces *inside* ``_Linear``, so a TE row-parallel output quantizer
  sees the reduced output (replicated over TP, or sequence-split under SP).

Resolution happens in ``_setup_quantizers`` - at build or in-place conversion time - so a TE
release whose signature lacks a name fails there with :class:`~megaquant.te.TESignatureError`,
not in the middle of training.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megaquant.nn.base import QuantModuleMixin
from megaquant.quantizer import TensorQuantizer
from megaquant.te.live import resolve_live, te_module
from megaquant.te.targets import GROUPED_LINEAR, LAYERNORM_LINEAR, LINEAR, TETarget
from megaquant.te.wrapper import quantizing


class _QuantTEMixin(QuantModuleMixin):
    """Shared plumbing: resolve positions at setup, patch TE's function around the forward."""

    te_target: TETarget
    # Tests point these at a TE-shaped double; None means the TE installed in this process.
    te_namespace: ModuleType | None = None
    te_version: str | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._setup_quantizers()

    def _namespace(self) -> ModuleType:
        return self.te_namespace if self.te_namespace is not None else te_module(self.te_target)

    def _resolve(self) -> None:
        # Conversion-time check: raises TESignatureError naming version, function and names.
        self._te_positions = resolve_live(self.te_target, self._namespace(), self.te_version)

    def _quantizing(self, operands: dict, weight_quantizers: list | tuple = ()):
        if torch.compiler.is_compiling():
            # TE 2.20 swaps _Linear for a registered custom op under torch.compile; the patch
            # would silently miss it, so refuse rather than train unquantized.
            raise NotImplementedError(
                f"{type(self).__name__}: quantized TE layers run eagerly; disable torch.compile "
                "for this module (torch.compiler.disable) or use the local spec"
            )
        return quantizing(self._namespace(), self._te_positions, operands, weight_quantizers)


def _any_enabled(quantizers) -> bool:
    return any(q.is_enabled for q in quantizers)


class QuantTELinearMixin(_QuantTEMixin):
    """Quantized ``TELinear`` / ``TEColumnParallelLinear`` / ``TERowParallelLinear``."""

    te_target = LINEAR

    def _setup_quantizers(self) -> None:
        self._resolve()
        super()._setup_quantizers()

    def forward(self, x: torch.Tensor):
        operands = {"inp": self.input_quantizer, "weight": self.weight_quantizer}
        if _any_enabled(operands.values()):
            with self._quantizing(operands):
                out, bias = super().forward(x)
        else:
            out, bias = super().forward(x)
        return self.output_quantizer(out), bias


class QuantTELayerNormLinearMixin(_QuantTEMixin):
    """Quantized ``TELayerNormColumnParallelLinear``: fused when it can be, unfused when not.

    TE computes the norm *inside* ``_LayerNormLinear``: the GEMM input never appears as an
    argument, so it cannot be fake-quantized there. Hence two routes:

    * ``input_quantizer`` off: TE's fused path, with ``weight`` quantized through the patch;
    * ``input_quantizer`` on: the norm in float32 torch (same formula TE uses: LayerNorm or
      RMSNorm, ``eps``, ``zero_centered_gamma``), then the input quantizer, then the GEMM. This
      is what an in-place-converted fused module must do to be correct. A spec-built model
      avoids it: :class:`megaquant.nn.te_spec.QuantTESpecProvider` offers the unfused layout
      (TE norm + quantized column-parallel linear), as Megatron's ModelOpt spec does, which
      keeps TE's fused GEMM for every linear.
    """

    te_target = LAYERNORM_LINEAR
    partition_axes = {"input": None, "weight": 0, "output": -1}

    def _setup_quantizers(self) -> None:
        self._resolve()
        super()._setup_quantizers()

    def forward(self, x: torch.Tensor):
        if self.input_quantizer.is_enabled:
            out, bias = self._unfused_forward(x)
        elif self.weight_quantizer.is_enabled:
            with self._quantizing({"weight": self.weight_quantizer}):
                out, bias = super().forward(x)
        else:
            out, bias = super().forward(x)
        return self.output_quantizer(out), bias

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.layer_norm_weight.float()
        if self.zero_centered_gamma:  # TE stores gamma - 1 so that zero init means identity
            gamma = gamma + 1
        xf = x.float()
        if self.normalization == "RMSNorm":
            y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * gamma
        else:
            y = F.layer_norm(xf, xf.shape[-1:], gamma, self.layer_norm_bias.float(), self.eps)
        return y.to(x.dtype)

    def _unfused_forward(self, x: torch.Tensor):
        """Norm, quantize, then the column-parallel GEMM with Megatron's TP mappings."""
        ln_out = self.input_quantizer(self._norm(x))
        if self.tp_size > 1:
            from megatron.core.tensor_parallel import mappings

            group = self._tp_group
            ln_out = (
                mappings.gather_from_sequence_parallel_region(ln_out, group=group)
                if self.sequence_parallel
                else mappings.copy_to_tensor_model_parallel_region(ln_out, group=group)
            )
        out = F.linear(ln_out, self.weight_quantizer(self.weight))
        bias = self.bias if self.use_bias else None
        if self.te_return_bias:
            return out, bias
        return (out if bias is None else out + bias), None


class QuantTEGroupedLinearMixin(_QuantTEMixin):
    """Quantized ``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear`` (MoE).

    One input quantizer for the token-concatenated input (all experts of this rank) and one
    weight quantizer per expert GEMM (``weight_quantizers[i]`` for ``weight{i}``): experts have
    independent weight ranges. The count is ``num_gemms``; TE's ``*args`` also carries biases
    (and fp8 weight copies in 1.x), so its length says nothing about the number of GEMMs.
    """

    te_target = GROUPED_LINEAR

    def _setup_quantizers(self) -> None:
        if getattr(self, "single_grouped_weight", False):
            raise NotImplementedError(
                f"{type(self).__name__}: TE's single_grouped_weight stores all experts in one "
                "tensor, which per-expert quantizers cannot address; build the layer with "
                "single_grouped_weight=False"
            )
        self._resolve()
        self.input_quantizer = TensorQuantizer()
        self.output_quantizer = TensorQuantizer()
        self.weight_quantizers = nn.ModuleList(TensorQuantizer() for _ in range(self.num_gemms))
        self.to(device=self.weight0.device)

    def calib_tensors(self, role: str) -> list:
        if role == "weight":
            return [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        return []

    def forward(self, x: torch.Tensor, m_splits):
        weight_qs = list(self.weight_quantizers)
        if _any_enabled([self.input_quantizer, *weight_qs]):
            with self._quantizing({"inp": self.input_quantizer}, weight_qs):
                out, bias = super().forward(x, m_splits)
        else:
            out, bias = super().forward(x, m_splits)
        return self.output_quantizer(out), bias
