"""How much each format choice of each layer group hurts: three scores from calibration data.

For every group ``g`` and candidate ``c`` the model runs unquantized except for ``g`` in ``c``:

* ``output``: the layer's relative output error ``sum (y_c - y)^2 / sum y^2``, the layer fed the
  unquantized model's own input (what it sees when it is the only quantized layer).
* ``fisher``: the second-order (Fisher) estimate of the loss increase,
  ``1/2 sum (dL/dy)^2 (y_c - y)^2`` with ``dL/dy`` the gradient of the summed token loss of the
  unquantized model (ModelOpt AutoQuantize's gradient score). Additive over layers, which is what
  the knapsack sums.
* ``kl``: the mean per-token KL(p_fp || p_c) of the model's next-token distributions with only
  ``g`` quantized: the most direct, and one full forward per (group, candidate).

``output`` and ``fisher`` come from one forward+backward of the unquantized model per batch
(hooks keep each layer's input, output and output gradient) plus one forward of each layer
alone per candidate; ``kl`` re-runs the model per choice, so it reads only ``kl_batches``.

Parallel reduction: a layer's sums are local to what this rank computed. Row-parallel outputs
are whole on every TP rank (all-reduced), so those sums are divided by the TP size; column-
parallel outputs are this rank's channels. Batches differ over DP ranks, experts over EP ranks.
Summing the corrected local values over the whole job therefore counts every (token, channel)
once, and every rank ends with the same numbers, hence the same decision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SCORES = ("fisher", "output", "kl")


def _positions(tokens):
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _replication(layer) -> int:
    """How many TP ranks hold the same output values of ``layer`` (row parallel: all)."""
    if layer.partition_axes.get("output") is None and layer.tp_group is not None:
        return dist.get_world_size(layer.tp_group)
    return 1


def apply_state(layer, state) -> None:
    """Configure ``layer``'s quantizers from a snapshot (None: everything off)."""
    for qname, _, q in layer.quantizers():
        if state is None or qname not in state:
            q.configure(None, "off")
            q.amax = q.amax.new_empty(0)  # an off quantizer keeps no stale amax (checkpoints)
            continue
        fmt, mode, amax = state[qname]
        q.configure(fmt, mode)
        if amax is not None:
            q.load_amax(amax)


def _capture(layers):
    """Hooks keeping (input, output, output grad) of each layer for one batch."""
    cache, handles = {}, []

    def hook(name):
        def fn(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            entry = cache.setdefault(name, {})
            entry["x"], entry["y"] = args[0].detach(), y.detach()
            if y.requires_grad:
                y.register_hook(lambda g: entry.__setitem__("dy", g.detach()))
        return fn

    for name, layer in layers:
        handles.append(layer.register_forward_hook(hook(name)))
    return cache, handles


def layer_scores(model, groups, snapshots, batches, dp_group) -> torch.Tensor:
    """``[G, C, 2]`` float64 (fisher, output) per group and candidate, equal on every rank.

    ``snapshots[c]``: layer name -> quantizer state for candidate ``c`` (None: unquantized, score
    0). ``batches``: ``[b, s+1]`` tokens (input and next-token labels), split over ``dp_group``.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(len(groups), len(snapshots), 3, dtype=torch.float64, device=device)
    layers = [(n, m) for g in groups for n, m in g.layers]
    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    model.eval()
    for tokens in batches[rank::size]:
        tokens = tokens.to(device)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        cache, handles = _capture(layers)
        try:
            with torch.enable_grad():
                model(inputs, _positions(inputs), None, labels=labels).float().sum().backward()
        finally:
            for h in handles:
                h.remove()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            _accumulate(sums, groups, snapshots, cache)
    _all_reduce_over_job(sums)
    fisher = 0.5 * sums[..., 0]
    output = sums[..., 1] / sums[..., 2].clamp_min(1e-30)
    return torch.stack([fisher, output], dim=-1).cpu()


def _accumulate(sums, groups, snapshots, cache) -> None:
    for gi, g in enumerate(groups):
        for name, layer in g.layers:
            entry = cache.get(name)
            if entry is None:  # an expert that got no tokens in this batch
                continue
            rep = _replication(layer)
            y, dy = entry["y"].double(), entry.get("dy")
            dy = torch.zeros_like(y) if dy is None else dy.double()
            for ci, state in enumerate(snapshots):
                if state is None:
                    continue
                apply_state(layer, state[name])
                try:
                    out = layer(entry["x"])
                finally:
                    apply_state(layer, None)
                diff2 = ((out[0] if isinstance(out, tuple) else out).double() - y) ** 2
                sums[gi, ci, 0] += (dy ** 2 * diff2).sum() / rep
                sums[gi, ci, 1] += diff2.sum() / rep
                sums[gi, ci, 2] += (y ** 2).sum() / rep


def _all_reduce_over_job(t: torch.Tensor) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)


def _vocab_log_softmax(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """log-softmax over a vocabulary split across ``tp_group`` (each rank: its slice)."""
    z = logits.double()
    zmax = z.max(dim=-1, keepdim=True).values
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=tp_group)
    total = (z - zmax).exp().sum(dim=-1, keepdim=True)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return z - zmax - total.log()


def kl_scores(model, groups, snapshots, batches, dp_group, tp_group) -> torch.Tensor:
    """``[G, C]`` float64 mean per-token KL(p_fp || p_c) with only group g in candidate c.

    ``tp_group``: the group the output layer splits the vocabulary over. Every rank runs every
    (group, candidate) forward in the same order, so TP and EP collectives pair up.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(len(groups), len(snapshots), dtype=torch.float64, device=device)
    tokens_seen = torch.zeros(1, dtype=torch.float64, device=device)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    model.eval()
    with torch.no_grad():
        for tokens in batches[rank::size]:
            inputs = tokens[:, :-1].contiguous().to(device)
            logp = _vocab_log_softmax(model(inputs, _positions(inputs), None), tp_group)
            tokens_seen += inputs.numel()
            for gi, g in enumerate(groups):
                for ci, state in enumerate(snapshots):
                    if state is None:
                        continue
                    for name, layer in g.layers:
                        apply_state(layer, state[name])
                    try:
                        logq = _vocab_log_softmax(model(inputs, _positions(inputs), None), tp_group)
                    finally:
                        for _, layer in g.layers:
                            apply_state(layer, None)
                    kl = (logp.exp() * (logp - logq)).sum(dim=-1)
                    if tp > 1:
                        dist.all_reduce(kl, group=tp_group)
                    sums[gi, ci] += kl.sum() / tp
    tokens_seen /= tp
    _all_reduce_over_job(sums)
    _all_reduce_over_job(tokens_seen)
    return (sums / tokens_seen.clamp_min(1)).cpu()
