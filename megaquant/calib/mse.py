"""MSE scale search: pick the weight scales that minimise each tensor's quantization error.

Max calibration maps the largest |w| to the top of the grid. That never clips, but one large
value stretches the grid for everything else; clipping it a little usually lowers the total
squared error ``||Q(w) - w||^2``. This module searches, per scale group, a clip ratio ``r`` from
``linspace(min_ratio, 1, ratios)`` (``r = 1`` is max calibration, so the search never loses):

1. **Per-tensor / per-channel amax** (FP8, INT8, NVFP4's global scale): candidates
   ``amax_r = r * amax``; error ``||fake_quantize(W, amax_r) - W||^2`` summed over the tensor (or
   each output row for a per-channel amax). The chosen amax is *pinned*: stored after max
   calibration in place of the max.
2. **Per-block scales** (NVFP4 blocks of 16, INT4 blocks of 128, MX blocks of 32): the block
   scales are computed at run time from each block's max, so a smaller block scale is obtained
   by clipping the block itself: candidates ``clamp(W_b, -r m_b, r m_b)`` with ``m_b`` the block's
   max; the error is measured against the unclipped ``W_b``. The winning clipped weights are
   written into the layer, so the statically stored weights carry the chosen block scales and
   the run-time quantization reproduces exactly the evaluated result.

Weights only: activation scales stay max-calibrated (an activation outlier carries signal,
and clipping it is what SmoothQuant avoids by other means). The one exception is an FP8 KV
cache, whose per-layer K/V scales are searched without clipping (:mod:`megaquant.calib.kv_mse`).

Parallel rules: the error of a TP-shared amax (per tensor; per channel of a row-parallel weight,
whose rows are split over ranks) is SUM-reduced over TP before the argmin, so every rank picks
the same ``r``; a per-channel amax of a column-parallel weight and every block are local (blocks
lie along the input dim and never straddle a shard: each rank blocks its own slice, padding a
last partial block, as RTN does). Weights are identical over DP: no DP reduction.
"""

from __future__ import annotations

import torch

from megaquant.calib import kv_mse
from megaquant.calib.capture import all_reduce, progress, quant_linears, select, weight_amax
from megaquant.calib.sync import SyncItem, tp_reduced
from megaquant.recipe_calib import MSEOptions as Options


def candidate_ratios(opts: Options) -> list[float]:
    return torch.linspace(opts.min_ratio, 1.0, opts.ratios).tolist() if opts.ratios > 1 else [1.0]


def search_amax(fmt, w: torch.Tensor, amax: torch.Tensor, ratios, reduce) -> torch.Tensor:
    """The amax (same shape as ``amax``) minimising ``||fake_quantize(w, r amax) - w||^2`` per
    scale group; ``reduce(err)`` sums the error over the ranks sharing that group."""
    best_err, best = None, amax.clone()
    for r in ratios:
        err = (fmt.fake_quantize(w, amax * r) - w).double().pow(2)
        err = err.sum() if amax.numel() == 1 else err.sum(dim=1, keepdim=True)
        err = reduce(err.reshape(amax.shape))
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, amax * r, best)
        best_err = torch.where(better, err, best_err)
    return best


def search_block_clip(fmt, w: torch.Tensor, amax, ratios, h: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``w`` [out, in] with each block clipped at the ratio of its max that minimises the block's
    error against the unclipped ``w``: the squared error, or with ``h`` [in, in] (the Hessian of
    the inputs, AWQ's clipping) the block's share of the output error ``d_b^T H_bb d_b``.

    A last partial block (input dim not a multiple of the block) is padded with zeros, as the
    format pads it: zeros change neither the block max nor the error.
    """
    bs = fmt.block_size
    rows, cols = w.shape
    nb = -(-cols // bs)
    pad = nb * bs - cols
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(rows, nb, bs)
    if h is not None:
        hp = torch.nn.functional.pad(h, (0, pad, 0, pad))
        hb = torch.stack([hp[i * bs:(i + 1) * bs, i * bs:(i + 1) * bs] for i in range(nb)])
    m = wp.abs().amax(-1, keepdim=True)
    best_err, best_r = None, torch.ones_like(m)
    for r in ratios:
        wc = torch.minimum(torch.maximum(wp, -m * r), m * r).reshape(rows, nb * bs)
        d = (fmt.fake_quantize(wc, amax).reshape(rows, nb, bs) - wp)
        err = (d.pow(2).sum(-1) if h is None
               else torch.einsum("rnb,nbc,rnc->rn", d, hb, d)).unsqueeze(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_r = torch.where(better, torch.full_like(m, r), best_r)
        best_err = torch.where(better, err, best_err)
    wc = torch.minimum(torch.maximum(wp, -m * best_r), m * best_r)
    return wc.reshape(rows, nb * bs)[:, :cols]


def run(model, opts: Options, forward_loop, dp_group) -> dict:
    pins, ratios = {}, candidate_ratios(opts)
    for name, layer in progress(select(quant_linears(model), opts.modules, "mse"), "mse"):
        q, w = layer.weight_quantizer, layer.weight.data.float()
        # A dynamic weight amax is recomputed at every forward: nothing to pin, clip blocks only.
        amax = weight_amax(layer, w) if q.mode == "static" else None
        if amax is not None:
            item = SyncItem(name, q, layer.partition_axes.get("weight"), w.shape, "weight")
            shared = tp_reduced(item)
            reduce = lambda e: all_reduce(e, layer.tp_group, "sum") if shared else e  # noqa: E731
            amax = search_amax(q.fmt, w, amax, ratios, reduce)
            pins[q] = amax
        bs = getattr(q.fmt, "block_size", None)
        if opts.blocks and bs:
            layer.weight.data.copy_(search_block_clip(q.fmt, w, amax, ratios))
    # A step limited to some linears (a mixed recipe's per-group step) leaves the KV cache alone:
    # the KV scales belong to the attention, which no linear glob names.
    if opts.modules == ("*",):
        pins.update(kv_mse.search(model, opts.ratios, forward_loop, dp_group))
    return pins
