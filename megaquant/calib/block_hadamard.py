"""Online block Hadamard (MR-GPTQ's "micro-rotation"): rotate a linear's input in each scale block.

A 4-bit block format gives each block of ``b`` input values (NVFP4 16, MX 32, INT4 128) one
scale set by the block's max: one outlier coarsens its whole block. Multiplying each block by
the normalised Hadamard ``H_b / sqrt(b)`` spreads that outlier over the block, and the values
become closer to Gaussian, which a 4-bit grid fits better (Egiazarian et al., "Bridging the Gap
Between Promise and Performance for Microscaling FP4", IST-DASLab/FP-Quant). The layer computes

    y = x W^T = (x T)(W T)^T,      T = I (x) H_b / sqrt(b)  (orthogonal, block-diagonal)

so ``W <- W T`` is folded into the weight *offline* (the weight is quantized in the rotated
basis), and ``x -> x T`` runs *online*, as a step of the quantized layer before its input
quantizer (``input_transform`` in :mod:`megaquant.nn.local`). Unlike the residual rotation it
needs no producer to fold into, so it suits ``linear_fc2`` (whose input, ``silu(gate) * up``, no
linear op produces) and ``linear_proj``.

Where and what it costs: one ``[tokens, b] x [b, b]`` GEMM per block of the input, ``2 b``
flops per input element (NVFP4: 32, i.e. about ``32 / k`` of the layer's own GEMM for k inputs:
1% for SmolLM2's fc2 with k = 1536); measured in ``benchmarks/transforms.py``. Options:
``block`` (0: the block of the layer's weight format; must be a power of two) and ``modules``
(glob patterns; default down_proj, i.e. ``*linear_fc2``).

Exports: vLLM applies compressed-tensors' ``transform_config`` (what llm-compressor's Hadamard
modifiers write). The ModelOpt / TensorRT-LLM layout has no way to say "rotate this input", so
the exporter refuses such a model there, naming the layers and the transform (never dropped).

Parallel rules: a row-parallel ``linear_fc2`` / ``linear_proj`` holds ``in / tp`` input columns
and sees the matching slice of the input; blocks lie inside one rank's slice as long as
``(in / tp) % b == 0``, which is checked (a layout where a block would straddle two ranks is
refused with the sizes). Every rank rotates its own columns; no collective.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from megaquant.calib.capture import progress, quant_linears
from megaquant.recipe_calib import BlockHadamardOptions as Options
from megaquant.transforms.hadamard import BlockHadamard


def targets(model: nn.Module, opts: Options) -> list[tuple[str, nn.Module, int]]:
    """(name, layer, block) of every quantized linear the transform applies to (checked)."""
    out = []
    for name, layer in quant_linears(model):
        if not any(fnmatch.fnmatchcase(name, p) for p in opts.modules):
            continue
        if not hasattr(type(layer), "input_transform"):
            raise ValueError(f"block_hadamard: {name} ({type(layer).__name__}) has no online "
                             "input transform step; use megaquant's local linears (spec 'local')")
        block = opts.block or getattr(layer.weight_quantizer.fmt, "block_size", 0)
        if not block:
            raise ValueError(f"block_hadamard: {name}'s weight format {layer.weight_quantizer.fmt} "
                             "has no block; set calib block_hadamard.block explicitly")
        width = layer.weight.shape[1]  # this rank's input columns
        if width % block:
            raise ValueError(
                f"block_hadamard: {name} has {width} input columns on this rank, not a multiple "
                f"of the block {block}: a block would straddle a tensor-parallel shard or pad. "
                "Choose a TP size or block that divides it.")
        out.append((name, layer, block))
    if not out:
        raise ValueError(f"block_hadamard: no quantized linear matches {list(opts.modules)}")
    return out


def prepare(model: nn.Module, opts: Options) -> None:
    """Install the online transform (on restore the weights already hold ``W T``)."""
    for _, layer, block in targets(model, opts):
        layer.input_transform = BlockHadamard(block)


def run(model: nn.Module, opts: Options, forward_loop, dp_group) -> dict:
    for _, layer, block in progress(targets(model, opts), "block_hadamard"):
        t = BlockHadamard(block)
        w = layer.weight.data
        w.copy_(t(w.double()).to(w.dtype))  # rows of W times T: the same blocks of columns
        layer.input_transform = t
    return {}


def transformed_layers(model: nn.Module) -> dict[str, int]:
    """name -> block of every layer with an online block Hadamard (for exporters)."""
    return {n: m.input_transform.block for n, m in model.named_modules()
            if isinstance(getattr(m, "input_transform", None), BlockHadamard)}
