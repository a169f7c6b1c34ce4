"""AWQ: activation-aware weight scaling for weight-only quantization (INT4, NVFP4, MXFP4).

Not all weights matter equally: a weight column that multiplies a large activation contributes
more to the output, so its rounding error costs more. AWQ (Lin et al., 2023) protects those
columns by scaling them *up* before quantization (``W * s``; the relative rounding error of a
larger value is smaller when the block scale is set by other elements) and folds ``1 / s`` into
the operation that produces the input, so the float model is unchanged:

    y = x W^T = (x / s) (W * s)^T  ->  quantized: (x / s) Q(W * s)^T

The scale is one exponent of the mean activation magnitude, ``s = mean|x|^alpha``, normalised by
``sqrt(max s * min s)``, and ``alpha`` is searched on a grid of ``grid`` points in ``[0, 1)``
(``alpha = 0`` is plain RTN, so the search never loses on its own objective). The objective is
the layer's output error over the calibration tokens,

    || X (Q(W s)/s - W)^T ||^2 = sum over rows r of  d_r^T H d_r,   H = X^T X,

evaluated from the Hessian ``H`` captured once (no activations kept; cost ``out x in^2`` per
candidate). Scales are folded like SmoothQuant's (:mod:`megaquant.calib.fold`): into the norm
before ``linear_qkv`` and ``linear_fc1``, into the ``up`` rows of ``linear_fc1`` before
``linear_fc2`` (SwiGLU), and into the ``V`` rows of ``linear_qkv`` before ``linear_proj`` (the
mean magnitudes are averaged over the query heads sharing a V under GQA, so ``s`` is tied).

Clipping (``clip: true``, AWQ's second step): for block formats, each block of the scaled
weight ``W s`` is then clipped at the ratio ``r`` of its max (``clip_ratios`` points in
``[clip_min, 1]``; ``r = 1`` is no clipping) that minimises the block's share of the output
error, ``d_b^T H'_bb d_b`` with ``H' = H / (s s^T)`` the Hessian of ``x / s`` and ``d_b`` the
block's quantization error against the unclipped weights (the block-diagonal part of the
output error; cross-block terms are ignored, as AWQ does). The run-time block scale is computed
from the block max, so the clipped weights reproduce exactly the chosen scales; a per-tensor
amax (NVFP4's global scale) is pinned to the one the candidates were scored with.

Parallel rules:

* ``H`` and ``mean|x|``: a column-parallel layer (qkv, fc1) sees the whole input (sums over TP
  only under sequence parallelism); a row-parallel layer (fc2) all-gathers its input over TP in
  the capture hook, so every rank holds the full-input-dimension statistics. SUM over DP.
* Column-parallel: ``s`` covers the replicated input and must be the same on all ranks. Each
  rank evaluates the loss of its own output rows; the per-candidate losses are SUM-reduced over
  TP (and a per-tensor weight amax of ``W * s``, e.g. NVFP4's global scale, MAX-reduced) before
  the argmin, so all ranks pick the same alpha.
* Row-parallel: the rows' errors mix all input channels, so the weight is all-gathered along the
  input dim; every rank runs the same search on the full matrix and keeps its slice of ``s``.
* Clipping is decided per (row, block) on each rank's own weight (blocks never straddle a
  shard; a row-parallel rank takes its slice of ``H'``): no collective, beyond the TP MAX of a
  per-tensor weight amax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaquant.calib.capture import (
    all_gather_cat,
    all_reduce,
    capture_inputs,
    chunks,
    group_size,
    is_row_parallel,
    progress,
    quant_linears,
    weight_amax,
)
from megaquant.calib.fold import fold_input_scale, producer_of
from megaquant.calib.mse import search_block_clip
from megaquant.calib.sync import SyncItem, tp_reduced
from megaquant.recipe_calib import AWQOptions as Options


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x|^alpha``, normalised so the geometric middle of the range stays at 1 (pure)."""
    s = x_mean.double().clamp(min=1e-4).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).float()


def output_error(dw: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``sum_r dw_r^T H dw_r``: the squared output error over the tokens H was built from."""
    return ((dw @ h) * dw).double().sum()


def _search(layer, w: torch.Tensor, full: bool, x_mean, h, grid: int) -> torch.Tensor:
    """Best ``s`` for weight ``w`` (the full matrix when ``full``, else this rank's rows)."""
    q = layer.weight_quantizer
    item = SyncItem("", q, layer.partition_axes.get("weight"), w.shape, "weight")
    scales = [awq_scales(x_mean, k / grid) for k in range(grid)]
    static = q.fmt.needs_amax and q.mode == "static"
    # The scaled weights are rebuilt in each loop instead of kept: one copy of W in memory.
    amaxes = [q.fmt.compute_amax(w * s[None, :]) if static else None for s in scales]
    if static and not full and tp_reduced(item):  # one collective for all candidates
        flat = all_reduce(torch.stack([a.reshape(()) for a in amaxes]), layer.tp_group, "max")
        amaxes = list(flat.unbind(0))
    losses = torch.stack([output_error(q.fmt.fake_quantize(w * s[None, :], a) / s[None, :] - w, h)
                          for a, s in zip(amaxes, scales)])
    if not full:
        all_reduce(losses, layer.tp_group, "sum")
    return scales[int(torch.argmin(losses))]


def _clip(layer, h_full: torch.Tensor, s_full: torch.Tensor, opts: Options):
    """Clip ``layer``'s (already scaled) local weight blocks; returns the amax to pin or None."""
    q = layer.weight_quantizer
    w = layer.weight.data.float()
    if is_row_parallel(layer) and group_size(layer.tp_group) > 1:
        n = w.shape[1]
        lo = dist.get_rank(layer.tp_group) * n
        h_full, s_full = h_full[lo:lo + n, lo:lo + n], s_full[lo:lo + n]
    h = h_full / (s_full[:, None] * s_full[None, :])  # the Hessian of x / s
    amax = weight_amax(layer, w) if q.mode == "static" else None
    ratios = torch.linspace(opts.clip_min, 1.0, opts.clip_ratios).tolist()
    layer.weight.data.copy_(search_block_clip(q.fmt, w, amax, ratios, h).to(layer.weight.dtype))
    return amax


def run(model, opts: Options, forward_loop, dp_group) -> dict:
    layers = [(n, m) for n, m in quant_linears(model) if producer_of(model, n) is not None]
    bar = progress(layers, "awq")
    pins = {}
    for part in chunks(layers, opts.layers_per_pass):
        stats = capture_inputs(model, forward_loop, part, dp_group, hessian=True, full_input=True)
        for name, layer in part:
            st, producer = stats.pop(name), producer_of(model, name)
            h = (st.hessian / max(st.count, 1)).float()
            x_mean = producer.tie((st.abs_sum / max(st.count, 1)).float(), "mean")
            full = is_row_parallel(layer)
            w = layer.weight.data.float()
            if full:
                w = all_gather_cat(w, layer.tp_group, dim=1)
            s_full = _search(layer, w, full, x_mean, h, opts.grid)
            s = s_full
            if full and group_size(layer.tp_group) > 1:
                s = s.chunk(group_size(layer.tp_group))[dist.get_rank(layer.tp_group)]
            fold_input_scale(layer, producer, s)
            if opts.clip and getattr(layer.weight_quantizer.fmt, "block_size", None):
                amax = _clip(layer, h, s_full, opts)
                if amax is not None:
                    pins[layer.weight_quantizer] = amax
            bar.update(1)
    bar.close()
    return pins
