"""A recipe's ``calib:`` section: which calibration algorithm runs, with which options.

This is configuration only (no torch, no collectives): parsing a recipe must not pull in the
algorithms. Each algorithm has here what a recipe needs to validate it at config time:

* ``options``: a frozen dataclass of its options (unknown keys are errors naming valid ones);
* ``check(roles)``: raise ValueError when the recipe's formats do not suit it;
* ``needs_data``: whether it reads activations (then ``quantize`` needs a ``forward_loop``).

The passes themselves live in :mod:`megaquant.calib` (``mse``, ``smoothquant``, ``awq``,
``gptq``, ``rotate_residual``, ``rotate_heads``, ``block_hadamard``), dispatched by
:mod:`megaquant.calib.passes`. A new algorithm adds its options and check here and its ``run``
there (``tests/calib/test_calib_registry.py`` checks both agree).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from megaquant.strict import check_keys


# ------------------------------------------------------------------------ options
def _globs(value) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class MSEOptions:
    ratios: int = 16  # candidates per search
    min_ratio: float = 0.5  # smallest clip ratio tried
    blocks: bool = True  # also search block clipping for block formats
    modules: tuple = ("*",)  # globs of the layers this step runs on (recipe version 4)

    def __post_init__(self):
        object.__setattr__(self, "modules", _globs(self.modules))
        if self.ratios < 1 or not 0.0 < self.min_ratio <= 1.0:
            raise ValueError("mse needs ratios >= 1 and 0 < min_ratio <= 1")


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = 0.5  # migration strength in [0, 1] (the fixed value when search is off)
    min_scale: float = 1e-5  # floor of s (a dead channel would otherwise divide by zero)
    search: bool = False  # pick alpha per layer by the quantized output error
    grid: int = 10  # search candidates: k / grid for k in 0..grid, plus s = 1
    sample_stride: int = 4  # search on every k-th calibration token
    layers_per_pass: int = 72  # linears captured per forward pass (0: all); bounds memory

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")
        if self.grid < 1 or self.sample_stride < 1:
            raise ValueError("smoothquant needs grid >= 1 and sample_stride >= 1")


@dataclass(frozen=True)
class AWQOptions:
    grid: int = 20  # alpha candidates: k / grid for k in 0..grid-1
    layers_per_pass: int = 72  # linears captured per forward pass (0: all); bounds Hessian memory
    clip: bool = True  # then search a clip ratio per weight block (block formats)
    clip_ratios: int = 11  # clip candidates in [clip_min, 1]
    clip_min: float = 0.5

    def __post_init__(self):
        if self.grid < 1:
            raise ValueError(f"awq grid must be >= 1, got {self.grid}")
        if self.clip_ratios < 1 or not 0.0 < self.clip_min <= 1.0:
            raise ValueError("awq needs clip_ratios >= 1 and 0 < clip_min <= 1")


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block: int = 128  # lazy-update block (rounded up to a multiple of the format's block)
    layers_per_pass: int = 72  # linears captured per forward pass (0: all); bounds memory
    sequential: bool = False  # block by block, Hessians from the quantized prefix (calib/gptq.py)
    act_order: bool = False  # format blocks in order of decreasing Hessian diagonal mass
    modules: tuple = ("*",)  # globs of the layers this step runs on (recipe version 4)

    def __post_init__(self):
        object.__setattr__(self, "modules", _globs(self.modules))
        if self.damp < 0 or self.block < 1:
            raise ValueError("gptq needs damp >= 0 and block >= 1")


@dataclass(frozen=True)
class RotateResidualOptions:
    seed: int | None = 0  # random signs of the randomized Hadamard (None in YAML: plain Hadamard)
    block: int = 0  # 0: one Hadamard of the hidden size; B: block-diagonal with blocks of B

    def __post_init__(self):
        if self.block < 0:
            raise ValueError("rotate_residual: block must be 0 (full) or a positive block size")


@dataclass(frozen=True)
class RotateHeadsOptions:
    seed: int | None = 0  # random signs of the Hadamard (None: plain Hadamard)


@dataclass(frozen=True)
class BlockHadamardOptions:
    block: int = 0  # 0: the weight format's block size
    modules: tuple = ("*linear_fc2",)  # glob patterns of the layers to transform

    def __post_init__(self):
        mods = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules)
        object.__setattr__(self, "modules", mods)
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0:
            raise ValueError(f"block_hadamard: block must be 0 (the format's) or a power of two, "
                             f"got {self.block!r}")


# ------------------------------------------------------------------------ checks
def _quantizes(roles, role: str) -> bool:
    return any(r == role and c is not None for r, c in roles)


def _check_mse(roles) -> None:
    fp8_kv = any(r == "k" and c is not None and c.format == "fp8" for r, c in roles)
    if not _quantizes(roles, "weight") and not fp8_kv:
        raise ValueError("MSE search works on weight scales and FP8 KV-cache scales, but the "
                         "recipe quantizes no weights and has no fp8 kv_cache")


def _check_smoothquant(roles) -> None:
    if not _quantizes(roles, "input"):
        raise ValueError("SmoothQuant smooths activations, but the recipe quantizes none "
                         "(no 'input' quantizer); use awq or gptq for weight-only recipes")
    if not _quantizes(roles, "weight"):
        raise ValueError("SmoothQuant moves range into the weights, but the recipe quantizes none")


def _check_awq(roles) -> None:
    if not _quantizes(roles, "weight"):
        raise ValueError("AWQ scales weights, but the recipe quantizes no weights")
    if _quantizes(roles, "input"):
        raise ValueError("AWQ is for weight-only recipes (it assumes full-precision activations), "
                         "but the recipe quantizes inputs; use smoothquant or gptq")


def _check_gptq(roles) -> None:
    if not _quantizes(roles, "weight"):
        raise ValueError("GPTQ rounds weights, but the recipe quantizes no weights")


def _check_any(roles) -> None:
    """Any recipe: the rotation is exact in float and helps whatever is quantized."""


def _check_block_hadamard(roles) -> None:
    if not _quantizes(roles, "weight"):
        raise ValueError("block_hadamard rotates quantized layers' inputs, but the recipe "
                         "quantizes no weights")


@dataclass(frozen=True)
class Algorithm:
    """What a recipe knows about one calibration algorithm (see the module docstring)."""

    options: type
    check: Callable
    needs_data: bool


ALGORITHMS: dict[str, Algorithm | None] = {  # "max": plain max calibration, nothing to run
    "max": None,
    "mse": Algorithm(MSEOptions, _check_mse, needs_data=False),
    "smoothquant": Algorithm(SmoothQuantOptions, _check_smoothquant, needs_data=True),
    "awq": Algorithm(AWQOptions, _check_awq, needs_data=True),
    "gptq": Algorithm(GPTQOptions, _check_gptq, needs_data=True),
    "rotate_residual": Algorithm(RotateResidualOptions, _check_any, needs_data=False),
    "block_hadamard": Algorithm(BlockHadamardOptions, _check_block_hadamard, needs_data=False),
    "rotate_heads": Algorithm(RotateHeadsOptions, _check_any, needs_data=False),
}
VALID_COMBINATIONS = (
    "max: any recipe; mse: recipes with weight quantizers or an fp8 kv_cache (searches weight "
    "amax and block clipping, and FP8 K/V scales); smoothquant: recipes that quantize "
    "activations (input) and weights, e.g. int8, fp8, nvfp4; awq: weight-only recipes (no "
    "input quantizer), e.g. int4_w4a16, nvfp4_w4a16; "
    "gptq: recipes with weight quantizers; rotate_residual: any recipe of a dense RMSNorm GPT; "
    "rotate_heads: any recipe; block_hadamard: recipes with weight quantizers (local linears); "
    "in a chain, smoothquant and awq must come before block_hadamard (they fold per-channel "
    "scales into the producer of an input, which the online transform would mix)"
)


def get_algorithm(name: str) -> Algorithm | None:
    """The config-time description of algorithm ``name`` (None for plain max calibration)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {name!r}; valid: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


# ------------------------------------------------------------------------ the section
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
        algos = [get_algorithm(s.algorithm) for s in self.steps]
        return any(a is not None and a.needs_data for a in algos)

    def build_options(self):
        algo = get_algorithm(self.algorithm)
        if algo is None:
            if self.options:
                raise ValueError(f"algorithm 'max' takes no options, got {sorted(self.options)}")
            return None
        check_keys(self.options, algo.options, f"algorithm {self.algorithm!r}", noun="option")
        return algo.options(**self.options)

    def to_dict(self):
        steps = [{"algorithm": s.algorithm, **s.options} for s in self.steps]
        return steps[0] if len(steps) == 1 else steps


def check_recipe_roles(calib: CalibConfig, roles: list[tuple[str, object]]) -> None:
    """Config-time check that every step of ``calib`` suits the recipe's (role, config) pairs."""
    for step in calib.steps:
        algo = get_algorithm(step.algorithm)
        if algo is None:
            continue
        try:
            algo.check(roles)
        except ValueError as e:
            raise ValueError(f"calib.algorithm={step.algorithm!r} does not apply to this recipe: "
                             f"{e}. Valid combinations: {VALID_COMBINATIONS}") from e
