"""SmoothQuant: move activation outliers into the weights, one input channel at a time.

A linear computes ``y = x W^T``. For any positive vector ``s`` over the input channels,
``y = (x / s) (W * s)^T`` exactly. Activations of LLMs have a few channels whose magnitude is
hundreds of times the median (SmolLM2's down_proj input reaches 3090 against a median amax of 6),
and a per-tensor activation scale must cover them, which leaves almost no resolution for the
others. Weights have no such outliers. SmoothQuant (Xiao et al., 2022) picks

    s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)

so that after the division the activation range of channel ``j`` and the weight range of column
``j`` meet in the middle (``alpha`` = how much of the difficulty moves to the weights; 0.5 by
default, larger for models with stronger outliers).

Where ``x / s`` goes: it must cost nothing at run time, so ``s`` is folded into the operation
that produces ``x``: the RMSNorm/LayerNorm weight before ``linear_qkv`` and ``linear_fc1``, and
the ``up`` rows of ``linear_fc1`` before ``linear_fc2`` of a SwiGLU MLP (its input is
``silu(gate) * up``, linear in ``up``). ``linear_proj``'s input comes out of attention and has no
such producer; it is left alone here (it needs a ``pre_quant_scale`` in the layer, see
docs/calibration.md). Max calibration then runs on the smoothed model.

Parallel rules:

* ``max|x_j|``: column-parallel layers (qkv, fc1) see the replicated input (or a sequence shard):
  MAX over TP, then MAX over DP -> the same ``s`` on every rank, as the replicated norm needs.
  The row-parallel fc2 sees its shard of the input channels: the vector stays sharded (MAX over
  DP only), exactly the channels of the local ``up`` rows it is folded into.
* ``max|W[:, j]|``: a column-parallel weight holds a shard of the output rows: MAX over TP. A
  row-parallel weight holds whole columns of its channels: local.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaquant.calib.algorithms import (all_reduce, capture_inputs, fold_input_scale, is_row_parallel,
                                        producer_of, progress, quant_linears)

NEEDS_DATA = True


@dataclass(frozen=True)
class Options:
    alpha: float = 0.5  # migration strength in [0, 1]
    min_scale: float = 1e-5  # floor of s (a dead channel would otherwise divide by zero)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")


def check(roles) -> None:
    if not any(r == "input" and c is not None for r, c in roles):
        raise ValueError("SmoothQuant smooths activations, but the recipe quantizes none "
                         "(no 'input' quantizer); use awq or gptq for weight-only recipes")
    if not any(r == "weight" and c is not None for r, c in roles):
        raise ValueError("SmoothQuant moves range into the weights, but the recipe quantizes none")


def smoothing_scale(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float,
                    min_scale: float) -> torch.Tensor:
    """The SmoothQuant vector (pure): ``x_amax**alpha / w_amax**(1-alpha)``, guarded.

    Channels never active (x_amax 0) or with an all-zero weight column keep ``s = 1``.
    """
    x, w = x_amax.double(), w_amax.double()
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    ok = (x > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=min_scale), torch.ones_like(s)).float()


def run(model, opts: Options, forward_loop, dp_group) -> dict:
    layers = [(n, l) for n, l in quant_linears(model)
              if l.input_quantizer.is_enabled and producer_of(model, n) is not None]
    stats = capture_inputs(model, forward_loop, layers, dp_group, hessian=False, full_input=False)
    for name, layer in progress(layers, "smoothquant"):
        w_amax = layer.weight.detach().abs().amax(0).float()
        if not is_row_parallel(layer):
            all_reduce(w_amax, layer.tp_group, "max")
        s = smoothing_scale(stats[name].amax, w_amax, opts.alpha, opts.min_scale)
        fold_input_scale(layer, producer_of(model, name), s)
    return {}
