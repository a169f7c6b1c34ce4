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
(hooks keep each layer's input and output until its output gradient arrives) plus one forward
of each layer alone per candidate; ``kl`` re-runs the model per choice, so it reads only
``kl_batches``.
The unquantized transformer blocks before a group's block give the same output for every
candidate: ``kl`` records each block's output once per batch and replays it, running only the
suffix from the group's block on (the same numbers as a full forward, at about half the cost).

A candidate is a :class:`LayerState` per layer: its quantizers' format, mode and amax and, where
the candidate's calibration algorithm rewrote the weight (GPTQ, MSE block clipping), that
weight, swapped in while the layer is scored (:func:`quantized`).

Parallel reduction: a layer's sums are local to what this rank computed. Row-parallel outputs
are whole on every TP rank (all-reduced), so those sums are divided by the TP size; column-
parallel outputs are this rank's channels. Batches differ over DP ranks, experts over EP ranks.
Summing the corrected local values over the whole job therefore counts every (token, channel)
once, and every rank ends with the same numbers, hence the same decision.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

SCORES = ("fisher", "output", "kl")


@dataclass(frozen=True)
class LayerState:
    """One layer as one candidate quantizes it.

    ``quantizers``: quantizer name -> (format, mode, amax or None) of the enabled quantizers;
    ``weight``: the weight the candidate's calibration algorithm wrote (None: the original).
    """

    quantizers: dict
    weight: torch.Tensor | None = None


def _positions(tokens):
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _replication(layer) -> int:
    """How many TP ranks hold the same output values of ``layer`` (row parallel: all)."""
    if layer.partition_axes.get("output") is None and layer.tp_group is not None:
        return dist.get_world_size(layer.tp_group)
    return 1


def apply_state(layer, state) -> None:
    """Configure ``layer``'s quantizers from ``LayerState.quantizers`` (None: everything off)."""
    for qname, _, q in layer.quantizers():
        if state is None or qname not in state:
            q.configure(None, "off")
            q.amax = q.amax.new_empty(0)  # an off quantizer keeps no stale amax (checkpoints)
            continue
        fmt, mode, amax = state[qname]
        q.configure(fmt, mode)
        if amax is not None:
            q.load_amax(amax)


@contextlib.contextmanager
def quantized(pairs):
    """``(layer, LayerState)`` pairs quantized as their candidate for the duration: quantizers
    configured and the candidate's weight swapped in (``.data``: no copy); then everything off
    and the original weights back, on every exit path."""
    saved = []
    try:
        for layer, state in pairs:
            apply_state(layer, state.quantizers)
            if state.weight is not None:
                saved.append((layer, layer.weight.data))
                layer.weight.data = state.weight
        yield
    finally:
        for layer, _ in pairs:
            apply_state(layer, None)
        for layer, weight in saved:
            layer.weight.data = weight


def _scoring_hooks(groups, snapshots, sums):
    """Forward hooks that score each layer as soon as its output gradient is known.

    The forward hook keeps the layer's input and output; a hook on the output's gradient then
    runs the layer in every candidate and adds its sums, and drops the kept tensors, so during
    backward the inputs and outputs of the layers already scored are freed (a cache of every
    layer's input, output and gradient held 3.3 GB on SmolLM2 at 4 x 512 tokens). The layer's
    own backward runs after the hook, with its weights and quantizers restored.
    """
    handles = []

    def hook(gi, name):
        def fn(module, args, output):
            if not torch.is_grad_enabled():  # the layer run by on_grad itself (no_grad)
                return
            y = output[0] if isinstance(output, tuple) else output
            kept = {"x": args[0].detach(), "y": y.detach()}

            def on_grad(dy):
                with torch.no_grad():
                    _score_layer(sums[gi], module, name, snapshots, kept.pop("x"),
                                 kept.pop("y"), dy)

            if y.requires_grad:
                y.register_hook(on_grad)
            else:  # no gradient reaches this output: the Fisher term is 0
                on_grad(None)
        return fn

    for gi, g in enumerate(groups):
        for name, layer in g.layers:
            handles.append(layer.register_forward_hook(hook(gi, name)))
    return handles


def layer_scores(model, groups, snapshots, batches, dp_group) -> torch.Tensor:
    """``[G, C, 2]`` float64 (fisher, output) per group and candidate, equal on every rank.

    ``snapshots[c]``: layer name -> :class:`LayerState` for candidate ``c`` (None: unquantized,
    score 0). ``batches``: ``[b, s+1]`` tokens (input and next-token labels), split over
    ``dp_group``.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(len(groups), len(snapshots), 3, dtype=torch.float64, device=device)
    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    model.eval()
    # One sequence per forward+backward: each sequence's loss depends on its own activations
    # only, so dL/dy and every sum are the batch's, while autograd holds one sequence's saved
    # tensors (4 x 512 tokens of SmolLM2 at once: ~6 GB, killed for memory on a shared host).
    # (An MoE with a capacity factor drops tokens per batch: its scores are one sequence's.)
    rows = [row for tokens in batches[rank::size] for row in tokens.split(1)]
    for tokens in rows:
        tokens = tokens.to(device)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        handles = _scoring_hooks(groups, snapshots, sums)
        try:
            with torch.enable_grad(), _activation_grads_only(model):
                model(inputs, _positions(inputs), None, labels=labels).float().sum().backward()
        finally:
            for h in handles:
                h.remove()
    _all_reduce_over_job(sums)
    fisher = 0.5 * sums[..., 0]
    output = sums[..., 1] / sums[..., 2].clamp_min(1e-30)
    return torch.stack([fisher, output], dim=-1).cpu()


@contextlib.contextmanager
def _activation_grads_only(model):
    """Backward computes the activation gradients only.

    The scores need ``dL/dy`` of each layer, never ``dL/dW``: parameters stop requiring grad
    and the embedding's output becomes the leaf that does, so backward skips every weight
    gradient (a third of a forward+backward, and the tied output layer's, the largest matmul).
    The activation gradients are computed by the same operations as before. Models without an
    ``embedding`` keep their parameter gradients (then dropped).
    """
    embedding = getattr(model, "embedding", None)
    params = [p for p in model.parameters() if p.requires_grad] if embedding is not None else []
    handle = None if embedding is None else embedding.register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_())
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for p in params:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)


def _score_layer(sums, layer, name, snapshots, x, y, dy) -> None:
    """Add one layer's sums of this batch to ``sums`` ``[C, 3]`` (its group's row).

    Element-wise work in float32, in place (it costs as much as the layer's matmul in float64),
    reduced by torch's cascade summation, then accumulated in float64: within 1e-5 relative of
    float64 throughout (``tests/auto/test_search.py``).
    """
    rep = _replication(layer)
    y = y.float()
    dy2 = torch.zeros_like(y) if dy is None else dy.float().square()
    y2 = y.square().sum().double() / rep
    for ci, state in enumerate(snapshots):
        if state is None:
            continue
        with quantized([(layer, state[name])]):
            out = layer(x)
        d = (out[0] if isinstance(out, tuple) else out).float() - y
        d.square_()
        sums[ci, 1] += d.sum().double() / rep
        sums[ci, 0] += d.mul_(dy2).sum().double() / rep
        sums[ci, 2] += y2


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


_BLOCK = re.compile(r"^(.*)\.(\d+)\.")  # "decoder.layers.<k>.": the transformer block of a layer


def _blocks(model):
    """The model's transformer blocks (``decoder.layers``), or None."""
    decoder = getattr(model, "decoder", None)
    return getattr(decoder, "layers", None)


def _first_block(group, blocks) -> int:
    """Index of the block holding ``group`` (0 where unknown: then nothing is skipped)."""
    m = _BLOCK.match(group.key)
    if blocks is None or m is None or not m.group(1).endswith("decoder.layers"):
        return 0
    return min(int(m.group(2)), len(blocks))


@contextlib.contextmanager
def _recording(blocks, outputs: dict):
    """Keep each block's output (``(hidden_states, context)``) of the next forward."""
    handles = [] if blocks is None else [
        b.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i, b in enumerate(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _replaying(blocks, k: int, outputs: dict):
    """Blocks ``0..k-1`` skipped: each returns the recorded output of block ``k-1``.

    Only the last skipped block's return value reaches block ``k`` (each skipped block ignores
    its input), so block ``k`` sees exactly what the unquantized prefix computed. Replacing the
    instance's ``forward`` keeps Megatron's own loop, final norm and output layer around it.
    """
    for j in range(k):
        blocks[j].forward = lambda *args, **kwargs: outputs[k - 1]
    try:
        yield
    finally:
        for j in range(k):
            del blocks[j].forward


_CHUNK = 256  # tokens per float64 log-softmax: bounds the [tokens, vocab] temporaries


def _reference(logits: torch.Tensor, tp_group) -> tuple:
    """``(p, sum_v p log p)`` per token of the unquantized logits, float64, this rank's vocab.

    Computed once per batch, in chunks of tokens: the per-choice KL then needs one
    log-softmax of its own logits, and no ``[tokens, vocab]`` float64 tensor is kept but ``p``.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    p = torch.empty(flat.shape, dtype=torch.float64, device=flat.device)
    plogp = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
    for i in range(0, flat.shape[0], _CHUNK):
        logp = _vocab_log_softmax(flat[i:i + _CHUNK], tp_group)
        p[i:i + _CHUNK] = logp.exp()
        plogp[i:i + _CHUNK] = (p[i:i + _CHUNK] * logp).sum(dim=-1)
    return p, plogp


def _token_kl(ref: tuple, logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Per token ``sum_v p (log p - log q)`` over this rank's vocabulary slice (float64):
    ``sum p log p`` from :func:`_reference` minus ``sum p log q``, chunked as there."""
    p, plogp = ref
    flat = logits.reshape(-1, logits.shape[-1])
    out = plogp.clone()
    for i in range(0, flat.shape[0], _CHUNK):
        logq = _vocab_log_softmax(flat[i:i + _CHUNK], tp_group)
        out[i:i + _CHUNK] -= (p[i:i + _CHUNK] * logq).sum(dim=-1)
    return out


def kl_scores(model, groups, snapshots, batches, dp_group, tp_group) -> torch.Tensor:
    """``[G, C]`` float64 mean per-token KL(p_fp || p_c) with only group g in candidate c.

    ``tp_group``: the group the output layer splits the vocabulary over. Every rank runs every
    (group, candidate) forward in the same order, so TP and EP collectives pair up (a replayed
    prefix skips the same blocks on every rank).
    """
    device = next(model.parameters()).device
    sums = torch.zeros(len(groups), len(snapshots), dtype=torch.float64, device=device)
    tokens_seen = torch.zeros(1, dtype=torch.float64, device=device)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    rank, size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    blocks = _blocks(model)
    model.eval()
    with torch.no_grad():
        for tokens in batches[rank::size]:
            inputs = tokens[:, :-1].contiguous().to(device)
            outputs = {}
            with _recording(blocks, outputs):
                ref = _reference(model(inputs, _positions(inputs), None), tp_group)
            tokens_seen += inputs.numel()
            for gi, g in enumerate(groups):
                k = _first_block(g, blocks)
                for ci, state in enumerate(snapshots):
                    if state is None:
                        continue
                    with quantized([(layer, state[name]) for name, layer in g.layers]), \
                            _replaying(blocks, k, outputs):
                        logits = model(inputs, _positions(inputs), None)
                    kl = _token_kl(ref, logits, tp_group)
                    if tp > 1:
                        dist.all_reduce(kl, group=tp_group)
                    sums[gi, ci] += kl.sum() / tp
    tokens_seen /= tp
    _all_reduce_over_job(sums)
    _all_reduce_over_job(tokens_seen)
    return (sums / tokens_seen.clamp_min(1)).cpu()
