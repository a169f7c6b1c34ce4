"""Replay the calibration loop through one transformer layer at a time, from cached inputs.

Sequential GPTQ (:mod:`megaquant.calib.gptq`) needs, for block ``i``, the inputs its linears
receive once blocks ``0 .. i-1`` are final. Running the whole model for every block costs
``N`` full forwards (``N^2 / 2`` layer forwards, plus the output layer each time: on SmolLM2
the 49152 x 576 output GEMM alone is a fifth of a forward). The inputs of block ``i`` depend
only on the final blocks before it, so GPTQ's reference implementation keeps them: here each
pass runs a *window* of two layers,

    cached input of layer i-1 ─► layer i-1 (final, quantized) ─► layer i (hooks capture)
                                                     └─ its input is cached for pass i+1

and skips the other layers and the output layer. That is two layer forwards per block instead
of ``i + 1`` plus the output layer, and every layer sees exactly the tensors the full forward
would give it (same inputs, same weights, same ops: the GPTQ weights are bit-identical, tested
in ``tests/calib/test_replay.py``). Cost: one layer input per calibration batch in memory
(SmolLM2, 4 x 512 tokens: 4.7 MB).

How: the decoder block's ``layers`` list is swapped for the window for the duration of one
``forward_loop(model)`` call (Megatron's TransformerBlock runs ``for layer in self.layers``); a
forward pre-hook on the window's first layer replaces its ``hidden_states`` by the cached tensor
of the same call; ``post_process`` is switched off, so the model returns the decoder's hidden
states instead of computing logits (the forward loop must only run the model, as
:func:`megaquant.evaluate.run_forward` does). The forward loop must run the same batches in the
same order on every call; a different number of calls or another shape is refused.

Only where the whole model is one process's GPTModel (no pipeline stages, no multi-token
prediction) and every stage is one of its decoder layers; otherwise :func:`find_layers` returns
None and GPTQ runs full forwards. Parallelism: every TP rank runs the same window (the
collectives inside the layers pair up), each DP rank replays its own batches.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def find_layers(model: nn.Module, names: list[str]):
    """(GPTModel, TransformerBlock, [layer per name]) when every name is one decoder layer of
    the same block, in forward order, and the model runs whole in this process; else None."""
    gpt = next((m for _, m in model.named_modules() if hasattr(m, "output_layer")
                and hasattr(m, "decoder") and hasattr(m, "post_process")), None)
    if gpt is None or not (gpt.pre_process and gpt.post_process):
        return None
    if getattr(gpt.config, "mtp_num_layers", None) or getattr(gpt, "mtp_process", False):
        return None
    block, modules = gpt.decoder, dict(model.named_modules())
    layers = [modules.get(n) for n in names]
    index = {id(layer): i for i, layer in enumerate(getattr(block, "layers", []))}
    pos = [index.get(id(layer)) for layer in layers]
    if any(p is None for p in pos) or pos != sorted(set(pos)):
        return None
    return gpt, block, layers


class LayerReplay:
    """The inputs of the last calibrated layer, and the passes that replay them."""

    def __init__(self, gpt: nn.Module, block: nn.Module):
        self.gpt, self.block = gpt, block
        self.last = None  # index in block.layers of the previous stage's layer
        self.cached = []  # its input, one tensor per forward call of the loop

    def run(self, model: nn.Module, forward_loop, layer: nn.Module) -> None:
        """``forward_loop(model)`` through the block's layers from the previous stage's layer
        (replayed from its cached inputs; the first stage: from layer 0 and the embedding) up
        to ``layer``, whose inputs are then cached for the next stage."""
        layers = list(self.block.layers)
        end = next(i for i, m in enumerate(layers) if m is layer)
        start = 0 if self.last is None else self.last
        seen, calls = [], [0]

        def replay(module, args, kwargs):
            k, x = calls[0], _hidden(args, kwargs)
            calls[0] += 1
            if k >= len(self.cached) or self.cached[k].shape != x.shape:
                raise ValueError(
                    "sequential GPTQ replays cached layer inputs: the forward loop must run the "
                    f"same batches in the same order on every call (call {k + 1}, shape "
                    f"{tuple(x.shape)}; {len(self.cached)} calls cached)")
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": self.cached[k]}
            return (self.cached[k], *args[1:]), kwargs

        def record(module, args, kwargs):
            seen.append(_hidden(args, kwargs).detach())

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True)]
        if self.last is not None:  # the window's first layer (start < end) gets cached inputs
            handles.append(layers[start].register_forward_pre_hook(replay, with_kwargs=True))
        try:
            with self._window(layers[start:end + 1]):
                forward_loop(model)
        finally:
            for h in handles:
                h.remove()
        if self.last is not None and calls[0] != len(self.cached):
            raise ValueError(f"sequential GPTQ: the forward loop ran {calls[0]} batches, the "
                             f"previous pass {len(self.cached)}: it must run the same batches")
        self.last, self.cached = end, seen

    @contextlib.contextmanager
    def _window(self, window: list[nn.Module]):
        """The block runs only ``window``; the model stops after the decoder (no logits)."""
        layers, post = self.block.layers, self.gpt.post_process
        self.block.layers = nn.ModuleList(window)
        self.gpt.post_process = False
        try:
            yield
        finally:
            self.block.layers = layers
            self.gpt.post_process = post


def _hidden(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
