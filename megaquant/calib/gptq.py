"""GPTQ: round the weights one input column at a time, correcting the rest for each error.

Round-to-nearest rounds every weight independently. GPTQ (Frantar et al., 2022) instead solves,
per linear, ``min ||X (Q - W)^T||^2`` over the calibration tokens ``X`` greedily: quantize
column ``j``, then update the not-yet-quantized columns so that the layer's *output* absorbs the
error (Optimal Brain Surgeon on ``H = X^T X``):

    e = (w_j - q_j) / [H^-1]_jj ;   W[:, k>j] -= e [H^-1]_{j, k>j}

With the upper Cholesky factor ``U`` of ``H^-1`` the row ``[H^-1]_{j, k>j} / [H^-1]_jj`` is just
``U[j, k>j] / U[j, j]``, so one factorisation serves every column. Updates are applied lazily in
blocks of ``block`` columns (the classic GPTQ trick: rank-``block`` updates instead of rank-1
over the whole matrix), so memory stays at one weight plus one ``in x in`` Hessian per layer.

Scales: the column is rounded with the scale the format will use at run time. For block formats
(NVFP4 16, MX 32, INT4 128) the block's scale is fixed when GPTQ enters the block, from the
block's current (already corrected) weights; each column is then quantized as part of a block
whose max is that value, so the format's own kernel computes the scale. Per-tensor / per-channel
amax (FP8, INT8, NVFP4's global scale) is the max of the original weights, pinned after max
calibration. The final weights are the dequantized ``Q`` (on the format's grid).

``damp`` (fraction of the mean diagonal added to ``H``) keeps ``H`` positive definite; a layer
whose Hessian still cannot be factorised (or yields non-finite weights) keeps its RTN weights,
with a warning that names it. By default activations are captured from the unquantized model in
one pass, ``layers_per_pass`` linears at a time.

``sequential: true`` (activation-aware, as GPTQ's reference code and MR-GPTQ run it): max
calibration first (activation scales), then transformer block by block in forward order, one
forward pass each with every quantizer *on*: a block's Hessians are built from the inputs its
GEMMs really receive at run time, i.e. produced by the already-GPTQ'd previous blocks with
quantized activations, and quantized by the layer's own input quantizer (after its online
transform, if any). The layers of one block share a pass (qkv, proj, fc1, fc2), with that
block's own weights unquantized (they are not GPTQ'd yet). Each pass runs only that block and
the one before it, from the previous block's inputs cached by the pass before
(:mod:`megaquant.calib.replay`: the same tensors a full forward gives, two layer forwards per
block instead of the whole model); where replay does not apply (pipeline stages, a quantized
linear outside the decoder layers) every pass runs the whole model.

``act_order: true`` processes the format's blocks (single columns for per-channel formats) in
order of decreasing ``sum diag(H)`` (inputs that carry the most energy first, while the most
columns remain to absorb their error); blocks stay contiguous, so block scales are unchanged.

Parallel rules: a column-parallel layer (qkv, fc1) holds whole input columns for its output
rows; GPTQ treats rows independently given ``H``, which is the full replicated-input Hessian
(SUM over TP only under sequence parallelism, SUM over DP), so each rank runs GPTQ on its own
rows. A row-parallel layer (proj, fc2) holds part of every row, and the error of one column is
pushed into columns of other ranks: its input is all-gathered over TP in the capture hook (full
``H``) and its weight along the input dim, every rank runs the same GPTQ on the full matrix and
keeps its slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import torch
import torch.distributed as dist

from megaquant.calib.capture import (
    all_gather_cat,
    capture_inputs,
    chunks,
    group_size,
    is_row_parallel,
    progress,
    quant_linears,
    select,
    warn,
    weight_amax,
)
from megaquant.calib.replay import LayerReplay, find_layers
from megaquant.recipe_calib import GPTQOptions as Options


class ColumnQuantizer:
    """Quantizes one weight column with the scale the format will use for it at run time.

    A block format computes each block's scale from the block's max. GPTQ fixes that max
    (``limit``, per row) when it enters a block; a column is then quantized as an element of a
    block whose max is ``limit``. The scale depends on nothing else, so the block ``[x, limit]``
    in the same format with ``block_size=2`` gives exactly the value the full block would, at
    2 elements per row instead of ``block_size`` (8x less work for NVFP4, 64x for INT4).

    NVFP4 with four-over-six scales: the block's choice (max -> 4 or -> 6) is made when GPTQ
    enters the block, by the format itself on the block's current weights; a max-4 block is then
    emulated with the pair ``[x, 1.5 limit]`` under the max-6 rule (the same scale, E4M3-rounded
    from ``1.5 limit / 6 = limit / 4``), and ``x`` stays clamped to ``limit``.
    """

    def __init__(self, fmt, amax):
        self.fmt, self.amax = fmt, amax
        self.group = getattr(fmt, "block_size", None) or 0
        self.four_over_six = getattr(fmt, "four_over_six", False)
        plain = {"scale_rule": "max6"} if self.four_over_six else {}
        self.pair = dataclasses.replace(fmt, block_size=2, **plain) if self.group else None
        self.limit = self.anchor = None

    def start_group(self, cols: torch.Tensor) -> None:
        self.limit = self.anchor = cols.abs().amax(dim=1)  # the block max sets the block's scale
        if self.four_over_six:
            self.anchor = torch.where(self._maps_to_four(cols), 1.5 * self.limit, self.limit)

    def _maps_to_four(self, cols: torch.Tensor) -> torch.Tensor:
        """Per row: does the format pick the max-4 scale for this block (padded like the format)?"""
        blk = torch.nn.functional.pad(cols, (0, self.group - cols.shape[1]))
        plain = dataclasses.replace(self.fmt, scale_rule="max6")
        err = lambda f: ((f.fake_quantize(blk, self.amax) - blk) ** 2).sum(1)  # noqa: E731
        return err(self.fmt) < err(plain)

    def __call__(self, col: torch.Tensor) -> torch.Tensor:
        if not self.group:
            return self.fmt.fake_quantize(col[:, None], self.amax)[:, 0]
        anchor = self.limit if self.anchor is None else self.anchor
        pair = torch.stack([torch.minimum(torch.maximum(col, -self.limit), self.limit), anchor],
                           dim=1)
        return self.pair.fake_quantize(pair, self.amax)[:, 0]


def group_bounds(n: int, shard: int, group: int) -> list[tuple[int, int]]:
    """The format's blocks along ``n`` input columns split in shards of ``shard`` columns.

    Blocks start at every multiple of ``group`` *within each shard* (a row-parallel rank
    quantizes its own slice, padding a last partial block); ``group`` 0: one column each.
    """
    step = group or 1
    return [(s + i, min(s + i + step, s + shard)) for s in range(0, n, shard)
            for i in range(0, shard, step)]


def lazy_blocks(groups: list[tuple[int, int]], width: int) -> list[tuple[int, int]]:
    """Consecutive format blocks packed into lazy-update blocks of at most ``width`` columns
    (at least one format block each: a block's scale is fixed from columns of one lazy block)."""
    out = []
    for lo, hi in groups:
        if out and hi - out[-1][0] <= width:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (float64), or None."""
    if not torch.isfinite(h).all():  # the factorisation reads one triangle only: check all
        return None
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    h = h.double() + damp * torch.diag(h).mean().double() * eye
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0 or not torch.isfinite(lower).all():
        return None
    u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return u if info.item() == 0 and torch.isfinite(u).all() else None


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, quant: ColumnQuantizer, block: int,
                  damp: float, shard: int | None = None,
                  act_order: bool = False) -> torch.Tensor | None:
    """GPTQ of ``w`` [out, in] with Hessian ``h`` [in, in]; None when ``h`` cannot be factorised.

    ``shard``: width of the slices the format quantizes separately (a row-parallel weight
    gathered from TP ranks); default the whole row. ``act_order``: see the module docstring.
    """
    groups = group_bounds(w.shape[1], shard or w.shape[1], quant.group)
    perm = None
    if act_order:
        mass = torch.diag(h).double()
        order = sorted(range(len(groups)), key=lambda i: -float(mass[slice(*groups[i])].sum()))
        perm = torch.cat([torch.arange(*groups[i]) for i in order])
        sizes = [groups[i][1] - groups[i][0] for i in order]
        ends = torch.tensor(sizes).cumsum(0).tolist()
        groups = [(e - n, e) for e, n in zip(ends, sizes)]
        w, h = w[:, perm], h[perm][:, perm]
    with _one_thread():
        out = _gptq(w, h, quant, block, damp, groups)
    return out if out is None or perm is None else out[:, torch.argsort(perm)]


@contextlib.contextmanager
def _one_thread():
    """Run the column loop on one intra-op thread: it is thousands of ops on vectors of a few
    thousand elements, where thread hand-offs cost more than they save (measured on a busy
    2-core machine: 40 s -> 1.1 s for one 3072 x 576 NVFP4 layer)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gptq(w, h, quant: ColumnQuantizer, block: int, damp: float, groups: list[tuple[int, int]]):
    w, h = w.clone().float(), h.clone().double()
    dead = torch.diag(h) == 0  # inputs that are always zero: any weight works, use 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_cholesky(h, damp)
    if u is None:
        return None
    u = u.float()
    starts = {lo: hi for lo, hi in groups}
    for i1, i2 in lazy_blocks(groups, block):
        w1, err = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        for i in range(i2 - i1):
            if quant.group and i1 + i in starts:
                quant.start_group(w1[:, i:starts[i1 + i] - i1])
            q = quant(w1[:, i])
            e = (w1[:, i] - q) / u[i1 + i, i1 + i]
            w1[:, i:] -= e[:, None] * u[i1 + i, i1 + i:i2][None, :]
            w1[:, i], err[:, i] = q, e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w if torch.isfinite(w).all() else None


def _quantize_layer(name, layer, st, opts: Options):
    """The GPTQ weight of ``layer`` (local shard) and the amax it used; None: keep RTN."""
    q = layer.weight_quantizer
    full = is_row_parallel(layer)
    w = layer.weight.data.float()
    if full:
        w = all_gather_cat(w, layer.tp_group, dim=1)
    group = getattr(q.fmt, "block_size", None) or 1
    amax = None
    if q.fmt.needs_amax:
        amax = q.fmt.compute_amax(w) if full else weight_amax(layer, w)
        if amax.dim() and amax.shape[0] != w.shape[0]:
            warn(f"gptq: {name}: per-input-channel weight amax is not supported; kept RTN")
            return None, None
    block = -(-max(opts.block, group) // group) * group
    out = gptq_quantize(w, st.hessian / max(st.count, 1), ColumnQuantizer(q.fmt, amax), block,
                        opts.damp, shard=layer.weight.shape[1], act_order=opts.act_order)
    if out is None:
        warn(f"gptq: {name}: the Hessian of its inputs is singular or non-finite (damp="
             f"{opts.damp}); this layer keeps round-to-nearest weights. Raise calib.damp or use "
             "more calibration tokens.")
        return None, None
    if full and group_size(layer.tp_group) > 1:
        out = out.chunk(group_size(layer.tp_group), dim=1)[dist.get_rank(layer.tp_group)]
    return out, amax


_BLOCK = re.compile(r"(.*\.layers\.\d+)\.")


def stages(layers: list[tuple[str, object]]) -> list[list[tuple[str, object]]]:
    """Consecutive linears of one transformer block (``...layers.<i>.``) as one stage each."""
    out, key = [], None
    for name, layer in layers:
        m = _BLOCK.match(name)
        k = m.group(1) if m else name
        if out and k == key:
            out[-1].append((name, layer))
        else:
            out.append([(name, layer)])
        key = k
    return out


def _replayed_loops(model, parts, forward_loop) -> list | None:
    """Per stage, a forward loop that runs only its block from cached inputs (calib/replay.py),
    or None where the model does not allow it (then every stage runs the whole model)."""
    names = [_BLOCK.match(part[0][0]) for part in parts]
    if not all(names):
        return None
    found = find_layers(model, [m.group(1) for m in names])
    if found is None:
        return None
    gpt, block, owners = found
    replay = LayerReplay(gpt, block)
    return [functools.partial(replay.run, forward_loop=forward_loop, layer=layer)
            for layer in owners]


@contextlib.contextmanager
def _float_weights(part):
    """The stage's own weights unquantized while its inputs are captured: they are about to be
    GPTQ'd, so their round-to-nearest version is not what will run (``proj`` then sees the
    float ``qkv`` output, with quantized activations)."""
    saved = [(layer.weight_quantizer, layer.weight_quantizer.mode) for _, layer in part]
    for q, _ in saved:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


def run(model, opts: Options, forward_loop, dp_group) -> dict:
    pins = {}
    layers = select(quant_linears(model), opts.modules, "gptq")
    if opts.sequential:  # activation scales first: the passes below run the quantized model
        from megaquant.calib.calibrate import calibrate

        calibrate(model, forward_loop, dp_group=dp_group)
    parts = stages(layers) if opts.sequential else chunks(layers, opts.layers_per_pass)
    loops = _replayed_loops(model, parts, forward_loop) if opts.sequential else None
    bar = progress(layers, "gptq (sequential)" if opts.sequential else "gptq")
    for i, part in enumerate(parts):
        with _float_weights(part if opts.sequential else []):
            stats = capture_inputs(model, loops[i] if loops else forward_loop, part, dp_group,
                                   hessian=True, full_input=True, quantized=opts.sequential)
        for name, layer in part:
            w, amax = _quantize_layer(name, layer, stats.pop(name), opts)
            if w is not None:
                layer.weight.data.copy_(w.to(layer.weight.dtype))
                if amax is not None and layer.weight_quantizer.mode == "static":
                    pins[layer.weight_quantizer] = amax
                    layer.weight_quantizer.load_amax(amax)  # the next passes run with it
            bar.update(1)
    bar.close()
    return pins
