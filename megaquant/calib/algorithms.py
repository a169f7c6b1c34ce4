"""Calibration algorithms beside max calibration: the interface, the registry and the dispatch.

Max calibration with round-to-nearest (RTN) takes every scale from the largest value it sees.
The algorithms here change *what* gets quantized (the weights, a norm) or *which* amax is used,
so that the same formats lose less. A recipe picks one::

    calib: {algorithm: smoothquant, alpha: 0.5}    # max | mse | smoothquant | awq | gptq

Every algorithm is one module with a docstring that teaches it, and the same interface:

* ``Options``: a frozen dataclass of its options (unknown keys are errors naming valid ones);
* ``check(roles)``: raise ValueError at config time when the recipe's formats do not suit it;
* ``run(model, opts, forward_loop, dp_group) -> pins``: a pass that runs *before* max
  calibration (``megaquant.ptq.quantize`` calls it). It may rewrite weights and norms, and it
  returns ``{weight_quantizer: amax}``: amax values the algorithm built its result on, which
  ``quantize`` stores *after* max calibration (max calibration would recompute them from the
  rewritten weights, and a clipped weight has a smaller max than the scale it was rounded with).

Helpers shared by the algorithms live here too: finding the quantized linears, capturing their
input statistics with forward hooks (quantizers off, so statistics are those of the unquantized
model), and tensor-parallel gathers and reductions. Folding a per-input-channel scale into the
operation that produces a linear's input lives in :mod:`megaquant.calib.fold`.

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

import dataclasses
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

ALGORITHMS = {  # name -> module implementing Options / check / run ("max": nothing to do)
    "max": None,
    "mse": "megaquant.calib.mse",
    "smoothquant": "megaquant.calib.smoothquant",
    "awq": "megaquant.calib.awq",
    "gptq": "megaquant.calib.gptq",
    "rotate_residual": "megaquant.calib.rotate_residual",
    "block_hadamard": "megaquant.calib.block_hadamard",
    "rotate_heads": "megaquant.calib.rotate_heads",
}
VALID_COMBINATIONS = (
    "max: any recipe; mse: recipes with weight quantizers (searches weight amax and block "
    "clipping); smoothquant: recipes that quantize activations (input) and weights, e.g. int8, "
    "fp8, nvfp4; awq: weight-only recipes (no input quantizer), e.g. int4_w4a16, nvfp4_w4a16; "
    "gptq: recipes with weight quantizers; rotate_residual: any recipe of a dense RMSNorm GPT; rotate_heads: any recipe; "
    "block_hadamard: recipes with weight quantizers (local linears); in a chain, smoothquant "
    "and awq must come before block_hadamard (they fold per-channel scales into the producer of "
    "an input, which the online transform would mix)"
)


def get_algorithm(name: str):
    """The module implementing algorithm ``name`` (None for plain max calibration)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {name!r}; valid: {sorted(ALGORITHMS)}")
    path = ALGORITHMS[name]
    return None if path is None else importlib.import_module(path)


@dataclass(frozen=True)
class CalibConfig:
    """A recipe's ``calib:`` section: the algorithm and its options (validated now).

    A list chains algorithms, run in order before max calibration, each on the model the
    previous one rewrote (``[{algorithm: smoothquant, search: true}, {algorithm: gptq}]``:
    GPTQ then sees the smoothed inputs). ``then`` holds the steps after the first.
    """

    algorithm: str = "max"
    options: dict = field(default_factory=dict)
    then: tuple = ()

    def __post_init__(self):
        self.build_options()
        names = [self.algorithm, *(s.algorithm for s in self.then)]
        if self.then and "max" in names:
            raise ValueError("'max' cannot be chained: it is what every chain ends with")
        late = [n for n in names[names.index("block_hadamard") + 1:]
                if n in ("smoothquant", "awq")] if "block_hadamard" in names else []
        if late:
            raise ValueError(f"{late[0]} after block_hadamard: its per-channel scales would be "
                             "folded into the producer of an input the online transform mixes; "
                             f"put {late[0]} before block_hadamard in the chain")

    @classmethod
    def from_dict(cls, d, where: str = "calib") -> "CalibConfig":
        if d is None:
            return cls()
        if isinstance(d, (list, tuple)):
            if not d:
                raise ValueError(f"{where}: an empty list of algorithms; use 'max' or omit it")
            steps = [cls.from_dict(x, f"{where}[{i}]") for i, x in enumerate(d)]
            return dataclasses.replace(steps[0], then=tuple(steps[1:]))
        if isinstance(d, str):
            d = {"algorithm": d}
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping like {{algorithm: mse}} or a list of "
                             f"them, got {d!r}")
        d = dict(d)
        try:
            return cls(algorithm=d.pop("algorithm", "max"), options=d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from e

    @property
    def steps(self) -> tuple["CalibConfig", ...]:
        """Every step of the chain, each a single-algorithm config."""
        return (dataclasses.replace(self, then=()), *self.then)

    @property
    def name(self) -> str:
        """``"smoothquant+gptq"`` for a chain, the algorithm's name otherwise."""
        return "+".join(s.algorithm for s in self.steps)

    @property
    def needs_data(self) -> bool:
        return any(get_algorithm(s.algorithm) is not None and
                   getattr(get_algorithm(s.algorithm), "NEEDS_DATA", True) for s in self.steps)

    def build_options(self):
        module = get_algorithm(self.algorithm)
        if module is None:
            if self.options:
                raise ValueError(f"algorithm 'max' takes no options, got {sorted(self.options)}")
            return None
        valid = [f.name for f in dataclasses.fields(module.Options)]
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            raise ValueError(f"algorithm {self.algorithm!r}: unknown option(s) {unknown}; "
                             f"valid options: {valid}")
        return module.Options(**self.options)

    def to_dict(self):
        steps = [{"algorithm": s.algorithm, **s.options} for s in self.steps]
        return steps[0] if len(steps) == 1 else steps


def check_recipe_roles(calib: CalibConfig, roles: list[tuple[str, object]]) -> None:
    """Config-time check that every step of ``calib`` suits the recipe's (role, QuantizerConfig)s."""
    for step in calib.steps:
        module = get_algorithm(step.algorithm)
        if module is None:
            continue
        try:
            module.check(roles)
        except ValueError as e:
            raise ValueError(f"calib.algorithm={step.algorithm!r} does not apply to this recipe: "
                             f"{e}. Valid combinations: {VALID_COMBINATIONS}") from e


def run_algorithm(model: nn.Module, calib: CalibConfig, forward_loop, dp_group) -> dict:
    """Run ``calib``'s passes in order (before max calibration); returns the amax pins."""
    if forward_loop is None and calib.needs_data:
        raise ValueError(f"calib.algorithm={calib.name!r} needs calibration data: pass a "
                         "forward_loop(model) to megaquant.quantize")
    pins = {}
    for step in calib.steps:
        module = get_algorithm(step.algorithm)
        if module is None:
            continue
        with torch.no_grad():
            pins.update(module.run(model, step.build_options(), forward_loop, dp_group))
    return pins


def prepare_algorithms(model: nn.Module, calib: CalibConfig) -> None:
    """The structural part of each step (an untied output layer, an online transform), for a
    model restored from a checkpoint: what ``run`` leaves besides weights, norms and amax."""
    for step in calib.steps:
        module = get_algorithm(step.algorithm)
        if module is not None and hasattr(module, "prepare"):
            module.prepare(model, step.build_options())


def apply_pins(pins: dict) -> None:
    """Store the amax values an algorithm rounded with (after max calibration)."""
    for q, amax in pins.items():
        q.load_amax(amax)


# ------------------------------------------------------------------------ finding layers
def quant_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every quantized linear whose weight quantizer is enabled."""
    from megaquant.nn.base import QuantModuleMixin

    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantModuleMixin):
            continue
        q = getattr(layer, "weight_quantizer", None)
        w = getattr(layer, "weight", None)
        if q is not None and q.is_enabled and w is not None and w.dim() == 2:
            out.append((name, layer))
    return out


def is_row_parallel(layer: nn.Module) -> bool:
    """Row-parallel layers split the weight along the input dim (partition axis 1)."""
    return layer.partition_axes.get("weight") == 1


def progress(items: list, desc: str):
    """One tqdm bar per job (rank 0), one step per layer."""
    show = not dist.is_initialized() or dist.get_rank() == 0
    return tqdm(items, desc=desc, disable=not show, leave=False)


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
    from megaquant.calib.sync import SyncItem, tp_reduced

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
    from megaquant.quantizer import disable_quantizers, enable_quantizers

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

    handles = [layer.register_forward_pre_hook(hook_for(n, layer), with_kwargs=True)
               for n, layer in layers]
    modes = {} if quantized else disable_quantizers(model)
    try:
        forward_loop(model)
    finally:
        enable_quantizers(model, modes)
        for h in handles:
            h.remove()
    _sync_stats(stats, layers, dp_group, full_input, hessian)
    return stats


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
