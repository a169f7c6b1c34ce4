"""What the calibration algorithms share: finding the quantized linears, capturing their inputs.

The algorithms (:mod:`~megaquant.calib.mse`, :mod:`~megaquant.calib.smoothquant`,
:mod:`~megaquant.calib.awq`, :mod:`~megaquant.calib.gptq`, the rotations; dispatched by
:mod:`megaquant.calib.passes`) all start the same way: find the linears whose weight quantizer is
on, then run the calibration data through the model with forward hooks that accumulate input
statistics (quantizers off, so statistics are those of the unquantized model). Folding a
per-input-channel scale into the operation that produces a linear's input lives in
:mod:`megaquant.calib.fold`; the algorithms' options (what a recipe may say) in
:mod:`megaquant.recipe_calib`.

Parallel rules shared by all algorithms (each module adds its own beside its code):

* Column-parallel layers see the replicated input (or a sequence shard under sequence
  parallelism): a per-input-channel max is MAX-reduced over TP, a sum (Hessian, mean |x|) is
  SUM-reduced over TP only under sequence parallelism (otherwise every rank holds the whole sum).
* Row-parallel layers see a shard of the input channels. A per-channel statistic stays sharded;
  an algorithm that needs the full input dimension (AWQ, GPTQ) all-gathers the input along its
  last dim inside the hook (every TP rank runs the same forward, so the collectives pair up).
* Data parallelism: sums are SUM-reduced and maxima MAX-reduced over ``dp_group`` once, after
  the loop (ranks may process different numbers of batches; no collective runs per batch).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from megaquant.calib.sync import SyncItem, tp_reduced
from megaquant.nn.base import QuantModuleMixin
from megaquant.quantizer import disable_quantizers, enable_quantizers
from megaquant.util import is_rank0


# ------------------------------------------------------------------------ finding layers
def quant_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every quantized linear whose weight quantizer is enabled."""
    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantModuleMixin):
            continue
        q = getattr(layer, "weight_quantizer", None)
        w = getattr(layer, "weight", None)
        if q is not None and q.is_enabled and w is not None and w.dim() == 2:
            out.append((name, layer))
    return out


def select(layers: list[tuple[str, nn.Module]], modules: tuple, algorithm: str) -> list:
    """The ``layers`` whose name matches one of the step's ``modules`` globs.

    A mixed-precision recipe runs each candidate's algorithm on the groups that chose it
    (``calib: [{algorithm: gptq, modules: [...]}]``); a glob list that matches no quantized
    linear is a typo, as a rule that matches nothing is, and refused.
    """
    import fnmatch

    out = [(n, m) for n, m in layers if any(fnmatch.fnmatchcase(n, p) for p in modules)]
    if layers and not out:
        raise ValueError(f"calib {algorithm}: modules {list(modules)} match no quantized linear; "
                         f"layers are named like {[n for n, _ in layers[:4]]}")
    return out


def is_row_parallel(layer: nn.Module) -> bool:
    """Row-parallel layers split the weight along the input dim (partition axis 1)."""
    return layer.partition_axes.get("weight") == 1


def progress(items: list, desc: str):
    """One tqdm bar per job (rank 0), one step per layer."""
    return tqdm(items, desc=desc, disable=not is_rank0(), leave=False)


def warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------ collectives
def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, group, op: str) -> torch.Tensor:
    """In-place SUM or MAX over ``group`` (no-op without one); returns ``t``."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def all_gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in rank order (the unsharded tensor)."""
    n = group_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def weight_amax(layer: nn.Module, w: torch.Tensor) -> torch.Tensor | None:
    """The weight amax max calibration would store for ``w`` (this rank's shard), TP-synced."""
    q = layer.weight_quantizer
    if not q.fmt.needs_amax:
        return None
    amax = q.fmt.compute_amax(w)
    item = SyncItem("", q, layer.partition_axes.get("weight"), w.shape, "weight")
    return all_reduce(amax, layer.tp_group, "max") if tp_reduced(item) else amax


# ------------------------------------------------------------------------ capture
@dataclass
class InputStats:
    """Statistics of one linear's input over the calibration tokens (float64 sums)."""

    amax: torch.Tensor | None = None  # per input channel, max |x|
    abs_sum: torch.Tensor | None = None  # per input channel, sum |x|
    hessian: torch.Tensor | None = None  # sum x x^T over tokens
    count: int = 0
    samples: list = field(default_factory=list)  # every k-th token's x (float32 rows)

    def sample_matrix(self, width: int) -> torch.Tensor:
        """The sampled tokens as one [tokens, width] matrix (empty when this rank saw none)."""
        return torch.cat(self.samples) if self.samples else torch.zeros(0, width)


def capture_inputs(model: nn.Module, forward_loop: Callable, layers: list[tuple[str, nn.Module]],
                   dp_group, *, hessian: bool, full_input: bool,
                   sample_stride: int = 0, quantized: bool = False) -> dict[str, InputStats]:
    """Run ``forward_loop`` with quantizers off and hooks on ``layers``; returns synced stats.

    Stats describe the input as the layer's GEMM receives it (:func:`as_gemm_input`): after its
    online transform, if any; ``quantized``: quantizers stay as they are (on, as at run time)
    and the stats are of the quantized input (sequential, activation-aware GPTQ).

    ``full_input``: all-gather row-parallel inputs over TP so that stats cover the full input
    dimension (AWQ, GPTQ, SmoothQuant's search); otherwise a row-parallel layer's stats stay
    sharded. ``sample_stride`` > 0 also keeps every k-th token of every batch (rows of the full
    input; under sequence parallelism the sequence is all-gathered first, so the same positions
    are kept at any TP size). Samples are not reduced: an algorithm sums its per-token errors
    over DP itself (a sum over tokens is additive over ranks).
    """
    stats = {name: InputStats() for name, _ in layers}

    def hook_for(name, layer):
        gather = full_input and is_row_parallel(layer)

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input_", kwargs.get("input"))
            x = as_gemm_input(layer, x.detach(), quantized).float()
            if gather:
                x = all_gather_cat(x, layer.tp_group, dim=-1)
            s = stats[name]
            if sample_stride > 0:
                full = x
                if not is_row_parallel(layer) and getattr(layer, "sequence_parallel", False):
                    full = all_gather_cat(x, layer.tp_group, dim=0)  # [s, b, h]: sequence first
                s.samples.append(full.reshape(-1, full.shape[-1])[::sample_stride].clone())
            x = x.reshape(-1, x.shape[-1])
            a, xa = x.abs().amax(0), x.abs().sum(0, dtype=torch.float64)
            s.amax = a if s.amax is None else torch.maximum(s.amax, a)
            s.abs_sum = xa if s.abs_sum is None else s.abs_sum + xa
            if hessian:
                h = (x.t() @ x).double()
                s.hessian = h if s.hessian is None else s.hessian + h
            s.count += x.shape[0]
        return hook

    forward_with_hooks(model, forward_loop, [(layer, hook_for(n, layer)) for n, layer in layers],
                       quantized)
    _sync_stats(stats, layers, dp_group, full_input, hessian)
    return stats


def forward_with_hooks(model: nn.Module, forward_loop: Callable, hooks: list, quantized: bool):
    """Run ``forward_loop(model)`` once with ``hooks`` ((module, pre-hook taking kwargs) pairs)
    attached, quantizers on only when ``quantized``; hooks and quantizer modes are restored even
    when the loop raises (a calibration error must not leave the model half-instrumented)."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in hooks]
    modes = {} if quantized else disable_quantizers(model)
    try:
        forward_loop(model)
    finally:
        enable_quantizers(model, modes)
        for h in handles:
            h.remove()


def as_gemm_input(layer: nn.Module, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    """``x`` as the layer's GEMM sees it: online-transformed (if the layer has a transform), then
    through the input quantizer when ``quantized`` (the same deterministic function the layer
    applies: a static amax, or per-block scales)."""
    transform = getattr(layer, "input_transform", None)
    if transform is not None:
        x = transform(x)
    if quantized and getattr(layer, "input_quantizer", None) is not None:
        x = layer.input_quantizer(x)
    return x


def _sync_stats(stats, layers, dp_group, full_input: bool, hessian: bool) -> None:
    """Reduce captured stats by the rules in the module docstring (same order on every rank)."""
    for name, layer in layers:
        s = stats[name]
        if s.amax is None:  # this rank saw no batch: neutral values of the right shape
            n = layer.weight.shape[1] * (group_size(layer.tp_group)
                                         if full_input and is_row_parallel(layer) else 1)
            s.amax, s.abs_sum = torch.zeros(n), torch.zeros(n, dtype=torch.float64)
            if hessian:
                s.hessian = torch.zeros(n, n, dtype=torch.float64)
        seq_split = not is_row_parallel(layer) and getattr(layer, "sequence_parallel", False)
        if not is_row_parallel(layer):
            all_reduce(s.amax, layer.tp_group, "max")
        sums = [s.abs_sum, torch.tensor([float(s.count)], dtype=torch.float64)]
        if s.hessian is not None:
            sums.append(s.hessian)
        for t in sums:
            if seq_split:
                all_reduce(t, layer.tp_group, "sum")
            all_reduce(t, dp_group, "sum")
        all_reduce(s.amax, dp_group, "max")
        s.count = int(sums[1].item())


def chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive chunks of ``size`` (all at once when size <= 0)."""
    if size <= 0:
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]
