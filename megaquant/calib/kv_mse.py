"""MSE search of FP8 KV-cache scales: align E4M3's grid with each layer's keys and values.

Max calibration maps a layer's largest |k| to 448, the top of E4M3. E4M3 has 3 mantissa bits,
so a value's rounding error depends on where it falls inside its binade (a step of 1/8 of the
value just above a power of two, 1/16 just below), and a per-tensor scale decides where every
value falls. Any amax in ``[m, 2m)`` (``m`` the max) is a different alignment of the same grid,
and none of them clips. With ``calib: {algorithm: mse}`` and an FP8 ``kv_cache:``, each layer's
K and V amax is searched over ``m * 2^(i/n)``, ``i = 0..n-1`` (``n`` = the mse ``ratios``
option) and the one with the smallest squared error over the calibration keys (or values) is
kept; ``i = 0`` is max calibration, so the search never loses on the calibration data. The
engines read the result like any scale: ``k_scale = amax / 448`` (exact, nothing else changes).

Measured on SmolLM2-135M (4 x 512 calibration tokens, perplexity on 8 x 512 Hamlet tokens):
the squared error drops 0-22% per tensor; see benchmarks/RESULTS.md for perplexity.

Not for NVFP4 KV (its amax is left to max calibration): there the global amax only moves the
E4M3 rounding of block scales that the engine computes at run time; a search (0.5..1.5 x max)
lowered the squared error by ~1% but raised perplexity (46.56 vs 45.82 on 8 x 512 tokens).
A fixed scale (``scale: unit``) is never searched.

Parallel rule: heads are split over TP and tokens over DP, so the max is MAX-reduced and the
candidate errors SUM-reduced over TP, then DP, before the argmin: every rank keeps the amax one
process computes over all heads and tokens (equal to rounding order; tested at TP=2 with SP and
DP=2 in tests/kv/test_kv_tp.py). Two forward passes over the calibration data, quantizers off.
"""

from __future__ import annotations

import torch

from megaquant.calib.capture import all_reduce, forward_with_hooks
from megaquant.nn.attention import QuantCoreAttentionMixin


def searched_attentions(model) -> list:
    """Core attentions whose K/V quantizers are FP8, static and calibrated (not a fixed 1.0)."""
    return [m for m in model.modules()
            if isinstance(m, QuantCoreAttentionMixin) and m.k_quantizer.is_enabled
            and m.k_quantizer.fmt.name == "fp8" and m.k_quantizer.mode == "static"
            and not getattr(m.k_quantizer, "fixed_amax", False)]


def candidate_factors(n: int) -> torch.Tensor:
    """``2^(i/n)``, ``i = 0..n-1``: every alignment of the grid, from max calibration (1.0)."""
    return torch.pow(2.0, torch.arange(n, dtype=torch.float64) / n).float()


def _observe(model, attns, forward_loop, fn) -> None:
    """Run ``forward_loop`` with quantizers off; ``fn(i, role, x)`` sees layer ``i``'s K (role
    0) and V (role 1) as the core attention receives them (found by name, as the quantizers)."""
    def hook_for(i, attn):
        pos = attn.kv_positions()

        def hook(module, args, kwargs):
            for role, name in enumerate(("key", "value")):
                x = kwargs[name] if name in kwargs else args[pos[name]]
                fn(i, role, x.detach().float())
        return hook

    forward_with_hooks(model, forward_loop, [(a, hook_for(i, a)) for i, a in enumerate(attns)],
                       quantized=False)


def _reduce(t: torch.Tensor, attns, dp_group, op: str) -> torch.Tensor:
    return all_reduce(all_reduce(t, getattr(attns[0], "tp_group", None), op), dp_group, op)


def search(model, ratios: int, forward_loop, dp_group) -> dict:
    """``{k_quantizer or v_quantizer: amax}`` for every searched core attention (empty if none)."""
    attns = searched_attentions(model)
    if not attns:
        return {}
    if forward_loop is None:
        raise ValueError("calib.algorithm=mse with an fp8 kv_cache searches the K/V scales on "
                         "calibration data: pass a forward_loop(model) to megaquant.quantize")
    amax = torch.zeros(len(attns), 2)

    def take_max(i, role, x):
        amax[i, role] = torch.maximum(amax[i, role], x.abs().max())

    _observe(model, attns, forward_loop, take_max)
    amax = _reduce(amax, attns, dp_group, "max")
    factors = candidate_factors(ratios)
    errors = torch.zeros(len(attns), 2, len(factors), dtype=torch.float64)
    fmt = attns[0].k_quantizer.fmt

    def add_errors(i, role, x):
        for j, f in enumerate(factors):
            d = fmt.fake_quantize(x, amax[i, role] * f) - x
            errors[i, role, j] += d.double().pow(2).sum()

    _observe(model, attns, forward_loop, add_errors)
    errors = _reduce(errors, attns, dp_group, "sum")
    best = amax * factors[errors.argmin(-1)]
    return {q: best[i, role].clone() for i, a in enumerate(attns)
            for role, q in enumerate((a.k_quantizer, a.v_quantizer))}
