"""The algorithms' numerics on synthetic layers, against independent references.

Each algorithm is judged by what it promises: SmoothQuant leaves the float product unchanged and
lowers the W8A8 error when activations have outlier channels; MSE never loses to max on the
weight error; AWQ's objective equals the explicit output error and beats RTN on outlier inputs;
GPTQ lowers the output error ``||X (Q - W)^T||`` below round-to-nearest and leaves weights on the
format's grid. References are computed directly in float64 from X and W.
"""

import pytest
import torch

from megaquant.calib import awq, gptq, mse, smoothquant
from megaquant.formats import get_format


def _data(seed=0, tokens=512, d_in=128, d_out=64, outliers=True):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * 0.3 + torch.eye(d_in)  # correlated channels
    x = torch.randn(tokens, d_in, generator=g) @ mix
    if outliers:
        x[:, :4] *= 60.0  # a few outlier channels, as in LLM activations
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    return x, w


def _out_err(x, w_q, w):
    return float(((x.double() @ (w_q.double() - w.double()).t()) ** 2).sum())


def test_smoothquant_scale_keeps_product_and_lowers_w8a8_error():
    x, w = _data()
    s = smoothquant.smoothing_scale(x.abs().amax(0), w.abs().amax(0), alpha=0.5, min_scale=1e-5)
    xs, ws = x / s, w * s
    torch.testing.assert_close(xs @ ws.t(), x @ w.t(), rtol=1e-4, atol=1e-3)
    act, wt = get_format("int8"), get_format("int8", axis=0)

    def w8a8_err(xx, ww):
        yq = (act.fake_quantize(xx, act.compute_amax(xx))
              @ wt.fake_quantize(ww, wt.compute_amax(ww)).t())
        return float(((yq.double() - (x @ w.t()).double()) ** 2).sum())

    assert w8a8_err(xs, ws) < 0.5 * w8a8_err(x, w)


def test_smoothquant_scale_matches_formula_and_guards_dead_channels():
    xa = torch.tensor([4.0, 0.0, 9.0, 1.0])
    wa = torch.tensor([1.0, 2.0, 0.0, 0.25])
    s = smoothquant.smoothing_scale(xa, wa, alpha=0.5, min_scale=1e-5)
    want = torch.tensor([2.0 / 1.0, 1.0, 1.0, 1.0 / 0.5])
    torch.testing.assert_close(s, want)


@pytest.mark.parametrize("fmt", [get_format("nvfp4"), get_format("int4", block_size=32),
                                 get_format("mxfp4"), get_format("fp8"),
                                 get_format("int8", axis=0)])
def test_mse_never_loses_to_max_on_weight_error(fmt):
    _, w = _data(1)
    w[3, 5] = 1.5  # one large weight stretches its block / row / tensor
    opts = mse.Options()
    ratios = mse.candidate_ratios(opts)
    amax = fmt.compute_amax(w) if fmt.needs_amax else None
    rtn = float((fmt.fake_quantize(w, amax) - w).pow(2).sum())
    if amax is not None:
        amax = mse.search_amax(fmt, w, amax, ratios, lambda e: e)
    wc = mse.search_block_clip(fmt, w, amax, ratios) if getattr(fmt, "block_size", None) else w
    got = float((fmt.fake_quantize(wc, amax) - w).pow(2).sum())
    assert got <= rtn * (1 + 1e-6)
    if fmt.name in ("nvfp4", "int4"):  # coarse grids in small blocks: clipping pays
        assert got < rtn * 0.995


def test_awq_objective_is_the_output_error():
    x, w = _data(2)
    d = torch.randn_like(w) * 1e-3
    h = (x.t() @ x).float()
    torch.testing.assert_close(float(awq.output_error(d, h)), _out_err(x, w + d, w),
                               rtol=1e-4, atol=0)


def _rtn(fmt, w):
    return fmt.fake_quantize(w, fmt.compute_amax(w) if fmt.needs_amax else None)


def test_awq_search_beats_rtn_on_outlier_inputs():
    x, w = _data(3)
    fmt = get_format("int4", block_size=32)
    h = (x.t() @ x).float() / x.shape[0]
    best, best_err = None, None
    for k in range(20):  # the search awq._search runs, written out with the explicit error
        s = awq.awq_scales(x.abs().mean(0), k / 20)
        e = _out_err(x, fmt.fake_quantize(w * s) / s, w)
        if best_err is None or e < best_err:
            best, best_err = s, e
    assert best_err < 0.8 * _out_err(x, _rtn(fmt, w), w)
    assert float(awq.output_error(fmt.fake_quantize(w * best) / best - w, h)) == pytest.approx(
        best_err / x.shape[0], rel=1e-3)


@pytest.mark.parametrize("name,opts", [("int4", {"block_size": 32}), ("nvfp4", {}),
                                       ("mxfp4", {}), ("fp8", {}), ("int8", {"axis": 0})])
def test_gptq_lowers_output_error_and_stays_on_grid(name, opts):
    x, w = _data(4, outliers=False)
    fmt = get_format(name, **opts)
    amax = fmt.compute_amax(w) if fmt.needs_amax else None
    h = (x.t() @ x).double()
    q = gptq.gptq_quantize(w, h, gptq.ColumnQuantizer(fmt, amax), block=64, damp=0.01)
    assert q is not None and torch.isfinite(q).all()
    assert _out_err(x, q, w) < 0.9 * _out_err(x, _rtn(fmt, w), w)
    # What the layer will compute at run time is the stored weight re-quantized: on the grid.
    requant = fmt.fake_quantize(q, amax)
    assert float((requant - q).abs().max()) <= 1e-6 * float(w.abs().max()) or \
        float((requant != q).float().mean()) < 0.02


def test_gptq_singular_hessian_returns_none_instead_of_nan():
    _, w = _data(5)
    h = torch.ones(w.shape[1], w.shape[1], dtype=torch.float64)  # rank 1: Cholesky must fail
    fmt = get_format("int4", block_size=32)
    assert gptq.gptq_quantize(w, h, gptq.ColumnQuantizer(fmt, None), block=64, damp=0.0) is None
    h[0, 1] = float("nan")
    assert gptq.gptq_quantize(w, h, gptq.ColumnQuantizer(fmt, None), block=64, damp=0.01) is None


@pytest.mark.parametrize("name,opts", [("int4", {"block_size": 32}), ("nvfp4", {}), ("mxfp4", {}),
                                       ("mxfp8", {})])
def test_gptq_pair_block_quantizes_a_column_as_its_full_block_would(name, opts):
    """ColumnQuantizer quantizes ``[x, limit]`` at block size 2; the reference puts the column in
    a full block of the format whose max is ``limit`` (all other elements zero): bit-exact."""
    fmt = get_format(name, **opts)
    g = torch.Generator().manual_seed(7)
    limit = torch.rand(256, generator=g) * 3 + 1e-3
    col = (torch.rand(256, generator=g) * 2.4 - 1.2) * limit  # some beyond the limit: clipped
    amax = torch.tensor(5.0) if fmt.needs_amax else None
    q = gptq.ColumnQuantizer(fmt, amax)
    q.limit = limit
    block = torch.zeros(256, fmt.block_size)
    block[:, 0], block[:, 1] = torch.minimum(torch.maximum(col, -limit), limit), limit
    assert torch.equal(q(col), fmt.fake_quantize(block, amax)[:, 0])


def test_gptq_four_over_six_columns_reproduce_the_formats_block_choice():
    """With the block fixed at entry, quantizing its columns one by one (no error feedback)
    must give what NVFP4 four-over-six gives for the whole block: the per-block 4-or-6 choice
    and its scale. Reference: the format's own fake_quantize of the block; bit-exact."""
    fmt = get_format("nvfp4", scale_rule="4over6")
    g = torch.Generator().manual_seed(11)
    cols = torch.randn(512, 16, generator=g) * torch.rand(512, 1, generator=g) * 3
    amax = cols.abs().amax() * 1.2
    q = gptq.ColumnQuantizer(fmt, amax)
    q.start_group(cols)
    assert (q.anchor != q.limit).any() and (q.anchor == q.limit).any(), "both choices occur"
    got = torch.stack([q(cols[:, i]) for i in range(16)], dim=1)
    assert torch.equal(got, fmt.fake_quantize(cols, amax))


@pytest.mark.parametrize("name,opts", [("int4", {"block_size": 32}), ("int8", {"axis": 0})])
def test_gptq_act_order_permutes_whole_blocks_and_undoes_the_permutation(name, opts):
    """Reference: plain GPTQ on the weight with its blocks pre-sorted by Hessian mass gives the
    act-order result (bit-exact after sorting back), and act order still beats RTN."""
    x, w = _data(8, d_in=96)
    x = x.flip(1)  # outlier channels last: act order must move them first
    fmt = get_format(name, **opts)
    amax = fmt.compute_amax(w) if fmt.needs_amax else None
    h = (x.t() @ x).double()
    cq = lambda: gptq.ColumnQuantizer(fmt, amax)  # noqa: E731
    got = gptq.gptq_quantize(w, h, cq(), block=64, damp=0.01, act_order=True)
    g = cq().group or 1
    mass = torch.diag(h).reshape(-1, g).sum(1)
    perm = torch.cat([torch.arange(i * g, (i + 1) * g) for i in torch.argsort(-mass).tolist()])
    want = gptq.gptq_quantize(w[:, perm], h[perm][:, perm], cq(), block=64, damp=0.01)
    assert not torch.equal(perm, torch.arange(96)), "the data should need a permutation"
    assert torch.equal(got[:, perm], want)
    assert _out_err(x, got, w) < 0.9 * _out_err(x, _rtn(fmt, w), w)


def test_gptq_blocks_follow_shards_and_pad_a_partial_block():
    assert gptq.group_bounds(80, 80, 32) == [(0, 32), (32, 64), (64, 80)]
    assert gptq.group_bounds(80, 40, 32) == [(0, 32), (32, 40), (40, 72), (72, 80)]
    assert gptq.lazy_blocks(gptq.group_bounds(80, 40, 32), 64) == [(0, 40), (40, 80)]
    x, w = _data(6, d_in=80, outliers=False)
    fmt = get_format("int4", block_size=32)
    h = (x.t() @ x).double()
    for shard in (80, 40):  # one rank's whole row / two row-parallel slices of 40
        q = gptq.gptq_quantize(w, h, gptq.ColumnQuantizer(fmt, None), block=64, damp=0.01,
                               shard=shard)
        rtn = torch.cat([fmt.fake_quantize(p) for p in w.split(shard, dim=1)], dim=1)
        assert _out_err(x, q, w) < 0.9 * _out_err(x, rtn, w)
        # each slice is re-quantized on its own at run time; GPTQ's values are on that grid
        requant = torch.cat([fmt.fake_quantize(p) for p in q.split(shard, dim=1)], dim=1)
        assert float((requant != q).float().mean()) < 0.02


@pytest.mark.parametrize("name,opts", [("int4", {"block_size": 32}), ("nvfp4", {})])
def test_awq_block_clipping_never_loses_on_its_objective(name, opts):
    x, w = _data(8, d_in=80, outliers=False)  # 80: a partial last block for int4-32
    w[5, 3] = 0.6  # a large weight stretches its block
    fmt = get_format(name, **opts)
    amax = fmt.compute_amax(w) if fmt.needs_amax else None
    h = (x.t() @ x).float() / x.shape[0]
    ratios = torch.linspace(0.5, 1.0, 11).tolist()
    wc = mse.search_block_clip(fmt, w, amax, ratios, h)
    # the block-diagonal output error the search minimises, computed directly per block
    def blockdiag(wq):
        d, bs = wq - w, fmt.block_size
        return sum(float(awq.output_error(d[:, i:i + bs], h[i:i + bs, i:i + bs]))
                   for i in range(0, w.shape[1], bs))
    assert blockdiag(fmt.fake_quantize(wc, amax)) < blockdiag(fmt.fake_quantize(w, amax))
    assert torch.equal(mse.search_block_clip(fmt, w, amax, [1.0], h), w)  # ratio 1: unchanged


def test_smoothquant_search_scores_the_quantized_output_and_never_loses_to_no_smoothing():
    from types import SimpleNamespace

    from megaquant.quantizer import TensorQuantizer

    x, w = _data(9, tokens=256)
    layer = SimpleNamespace(weight_quantizer=TensorQuantizer(get_format("int8", axis=0), "static"),
                            input_quantizer=TensorQuantizer(get_format("int8"), "static"),
                            partition_axes={"weight": 0}, tp_group=None)
    act, wt = get_format("int8"), get_format("int8", axis=0)

    def w8a8_err(s):  # what max calibration + run time would compute, written out
        xs, ws = x / s, w * s
        yq = act.fake_quantize(xs, xs.abs().amax()) @ wt.fake_quantize(ws, wt.compute_amax(ws)).t()
        return float(((yq.double() - (x @ w.t()).double()) ** 2).sum())

    opts = smoothquant.Options(search=True, grid=10)
    x_amax, w_col = x.abs().amax(0), w.abs().amax(0)
    s = smoothquant._search(layer, w, False, x_amax, w_col, x, opts, None)
    cands = [torch.ones(w.shape[1])] + [smoothquant.smoothing_scale(x_amax, w_col, k / 10, 1e-5)
                                        for k in range(11)]
    errs = [w8a8_err(c) for c in cands]
    assert w8a8_err(s) == pytest.approx(min(errs), rel=1e-6)
    assert w8a8_err(s) < 0.5 * errs[0]  # outlier channels: smoothing pays
