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

``search: true`` picks ``alpha`` per layer instead: every candidate on a grid of ``grid + 1``
points in ``[0, 1]``, plus ``s = 1`` (no smoothing, so the search never loses to RTN on its own
objective), is scored by the layer's output error with *both* operands quantized as they will
be at run time,

    || Q_in(X / s) Q_w(W * s)^T - X W^T ||^2

over every ``sample_stride``-th calibration token ``X`` (the per-tensor input amax of ``X / s``
is ``max_j max|x_j| / s_j``, exactly what max calibration will store). One fixed ``alpha`` rarely
suits every layer: a down_proj with 3090 outliers wants most of the range in the weights, an
o_proj with none wants little.

Where ``x / s`` goes (:mod:`megaquant.calib.fold`): it must cost nothing at run time, so ``s``
is folded into the operation that produces ``x``: the norm before ``linear_qkv`` and
``linear_fc1``, the ``up`` rows of a SwiGLU ``linear_fc1`` before ``linear_fc2``, and the ``V``
rows of ``linear_qkv`` before ``linear_proj`` (statistics tied over the query heads that share
a V under GQA). Max calibration then runs on the smoothed model.

Parallel rules:

* Statistics are captured over the full input dimension: a row-parallel layer (proj, fc2)
  all-gathers its input over TP in the capture hook. ``max|x_j|``: MAX over TP for a
  column-parallel layer under sequence parallelism (a sequence shard each), MAX over DP.
* ``max|W[:, j]|``: a column-parallel weight holds a shard of the output rows: MAX over TP. A
  row-parallel weight is all-gathered along the input dim: every rank computes the same full
  ``s`` and folds its own slice (the channels of its local up / V rows).
* Search: a column-parallel rank scores its own output rows on all sampled tokens (the
  sequence is all-gathered under SP), so the per-candidate errors are SUM-reduced over TP; a
  row-parallel rank scores the full matrix (no TP reduction). Errors are sums over tokens:
  SUM over DP. A per-tensor weight amax of a column-parallel ``W * s`` is MAX-reduced over TP.
  Every rank therefore picks the same ``alpha``.
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
)
from megaquant.calib.fold import fold_input_scale, producer_of
from megaquant.calib.sync import SyncItem, tp_reduced
from megaquant.recipe_calib import SmoothQuantOptions as Options


def smoothing_scale(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float,
                    min_scale: float) -> torch.Tensor:
    """The SmoothQuant vector (pure): ``x_amax**alpha / w_amax**(1-alpha)``, guarded.

    Channels never active (x_amax 0) or with an all-zero weight column keep ``s = 1``.
    """
    x, w = x_amax.double(), w_amax.double()
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    ok = (x > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=min_scale), torch.ones_like(s)).float()


def _input_amax(layer, x_amax: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
    """The per-tensor input amax max calibration will store for ``x / s`` (None: dynamic)."""
    q = layer.input_quantizer
    if not q.fmt.needs_amax or q.mode != "static":
        return None
    return (x_amax / s).max()


def _search(layer, w: torch.Tensor, full: bool, x_amax, w_col, x: torch.Tensor, opts: Options,
            dp_group) -> torch.Tensor:
    """The candidate ``s`` with the smallest quantized output error (same on every rank)."""
    qw, qi = layer.weight_quantizer, layer.input_quantizer
    cands = [torch.ones_like(x_amax)] + [
        smoothing_scale(x_amax, w_col, k / opts.grid, opts.min_scale) for k in range(opts.grid + 1)]
    item = SyncItem("", qw, layer.partition_axes.get("weight"), w.shape, "weight")
    static_w = qw.fmt.needs_amax and qw.mode == "static"
    amaxes = [qw.fmt.compute_amax(w * s[None, :]) if static_w else None for s in cands]
    if static_w and not full and tp_reduced(item):  # one collective for all candidates
        flat = all_reduce(torch.stack([a.reshape(()) for a in amaxes]), layer.tp_group, "max")
        amaxes = list(flat.unbind(0))
    ref = x @ w.t()
    errs = []
    for s, aw in zip(cands, amaxes):
        xq = qi.fmt.fake_quantize(x / s, _input_amax(layer, x_amax, s)) if x.numel() else x
        wq = qw.fmt.fake_quantize(w * s[None, :], aw)
        errs.append((xq @ wq.t() - ref).double().pow(2).sum())
    errs = torch.stack(errs)
    if not full:
        all_reduce(errs, layer.tp_group, "sum")
    all_reduce(errs, dp_group, "sum")
    return cands[int(torch.argmin(errs))]


def run(model, opts: Options, forward_loop, dp_group) -> dict:
    layers = [(n, m) for n, m in quant_linears(model)
              if m.input_quantizer.is_enabled and producer_of(model, n) is not None]
    bar = progress(layers, "smoothquant")
    stride = opts.sample_stride if opts.search else 0
    for part in chunks(layers, opts.layers_per_pass):
        stats = capture_inputs(model, forward_loop, part, dp_group, hessian=False,
                               full_input=True, sample_stride=stride)
        for name, layer in part:
            st, producer = stats.pop(name), producer_of(model, name)
            full = is_row_parallel(layer)
            w = layer.weight.data.float()
            if full:
                w = all_gather_cat(w, layer.tp_group, dim=1)
            w_col = w.abs().amax(0)
            if not full:
                all_reduce(w_col, layer.tp_group, "max")
            x_amax, w_col = producer.tie(st.amax, "max"), producer.tie(w_col, "max")
            if opts.search:
                s = _search(layer, w, full, x_amax, w_col, st.sample_matrix(w.shape[1]), opts,
                            dp_group)
            else:
                s = smoothing_scale(x_amax, w_col, opts.alpha, opts.min_scale)
            if full and group_size(layer.tp_group) > 1:
                s = s.chunk(group_size(layer.tp_group))[dist.get_rank(layer.tp_group)]
            fold_input_scale(layer, producer, s)
            bar.update(1)
    bar.close()
    return {}
