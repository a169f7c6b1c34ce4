"""Quantization recipes: an ordered list of rules, matched by glob on module names.

A recipe (``recipes/<name>.yaml``, chosen with ``+recipe=<name>``) looks like::

    name: nvfp4
    rules:
      - modules: "*"                       # every quantizable layer
        weight: {format: nvfp4}
        input:  {format: nvfp4}
      - modules: "*linear_fc2*"            # a later rule overrides the roles it names
        input: null                        # null: that quantizer stays off
    exclude: ["*output_layer*", "*router*"]  # layers never converted (may match nothing)

Each role (``input``, ``weight``, ``output``) takes a :class:`QuantizerConfig`: ``format`` (a name
from :data:`megaquant.formats.FORMATS`), ``amax`` (``static``: calibrated once; ``dynamic``:
from each tensor) and the format's own options (``axis``, ``block_size``, ``dtype``,
``scale_rule``), which the format's dataclass validates. Unknown keys anywhere are errors that
name the valid ones; a rule whose pattern matches no layer is an error too (a typo would
otherwise silently quantize nothing), while ``exclude`` patterns are allowed to miss because the
defaults cover layers that only some models have.

An optional ``calib:`` section picks the calibration algorithm run before max calibration
(:mod:`megaquant.calib.algorithms`)::

    calib: {algorithm: smoothquant, alpha: 0.5}   # max (default) | mse | smoothquant | awq | gptq
    calib: [{algorithm: smoothquant, search: true}, gptq]   # a chain, run in order

Its options are validated by the algorithm, and an algorithm that does not suit the recipe's
formats (SmoothQuant on a weight-only recipe, AWQ with quantized activations) is an error here,
at config time, naming the valid combinations.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megaquant.calib.algorithms import CalibConfig, check_recipe_roles
from megaquant.formats import QuantFormat, get_format

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
ROLES = ("input", "weight", "output")
AMAX_MODES = ("static", "dynamic")
DEFAULT_EXCLUDE = ["*output_layer*", "*router*"]


def _check_keys(d: dict, cls, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor role is quantized: a format, its options, and static or dynamic amax."""

    format: str
    amax: str = "static"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.amax not in AMAX_MODES:
            raise ValueError(f"amax must be one of {AMAX_MODES}, got {self.amax!r}")
        self.build_format()  # validates the format name and its options now, not mid-run

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "QuantizerConfig":
        if not isinstance(d, dict) or "format" not in d:
            raise ValueError(f"{where}: expected a mapping with a 'format' key, got {d!r}")
        d = dict(d)
        fmt, amax = d.pop("format"), d.pop("amax", "static")
        try:
            return cls(format=fmt, amax=amax, options=d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from e

    def build_format(self) -> QuantFormat:
        return get_format(self.format, **self.options)

    @property
    def mode(self) -> str:
        return self.amax


_UNSET = object()  # a role a rule does not mention (as opposed to null: turn it off)


def _check_static_choice(cfg: "QuantizerConfig | None", role: str, where: str) -> None:
    """NVFP4's four-over-six choice is made when a weight is quantized; engines compute
    activation block scales with the max-6 rule, so on an activation it would not be served."""
    if cfg is not None and role != "weight" and cfg.options.get("scale_rule") == "4over6":
        raise ValueError(f"{where}: scale_rule '4over6' is chosen per block when a *weight* is "
                         "quantized; inference engines scale activations with the max-6 rule. "
                         "Use it on the weight role only (remove it from this role).")


@dataclass(frozen=True)
class Rule:
    """Apply quantizer configs to the roles of every layer whose name matches ``modules``."""

    modules: tuple[str, ...]
    roles: dict  # role -> QuantizerConfig | None (off); roles absent are left as they were

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Rule":
        valid = ["modules", *ROLES]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
        if "modules" not in d:
            raise ValueError(f"{where}: a rule needs 'modules' (a glob or list of globs)")
        mods = d["modules"]
        mods = (mods,) if isinstance(mods, str) else tuple(mods)
        roles = {}
        for role in ROLES:
            if role in d:
                v = d[role]
                roles[role] = None if v is None else QuantizerConfig.from_dict(v, f"{where}.{role}")
                _check_static_choice(roles[role], role, f"{where}.{role}")
        return cls(modules=mods, roles=roles)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.modules)


@dataclass(frozen=True)
class Recipe:
    """A named, validated list of rules plus the layers to leave alone."""

    name: str
    rules: tuple[Rule, ...]
    exclude: tuple[str, ...] = tuple(DEFAULT_EXCLUDE)
    description: str = ""
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self):
        if not isinstance(self.calib, CalibConfig):
            raise TypeError(f"recipe {self.name!r}: calib must be a CalibConfig, got "
                            f"{type(self.calib).__name__}; use CalibConfig.from_dict(...)")
        roles = [(role, cfg) for rule in self.rules for role, cfg in rule.roles.items()]
        try:
            check_recipe_roles(self.calib, roles)
        except ValueError as e:
            raise ValueError(f"recipe {self.name!r}: {e}") from e

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        _check_keys(d, cls, "recipe")
        name = d.get("name", "custom")
        rules = d.get("rules")
        if not rules:
            raise ValueError(f"recipe {name!r}: 'rules' must be a non-empty list")
        return cls(
            name=name,
            rules=tuple(Rule.from_dict(r, f"recipe {name!r} rules[{i}]") for i, r in enumerate(rules)),
            exclude=tuple(d.get("exclude", DEFAULT_EXCLUDE)),
            description=d.get("description", ""),
            calib=CalibConfig.from_dict(d.get("calib"), f"recipe {name!r} calib"),
        )

    def is_excluded(self, name: str) -> str | None:
        """The exclude pattern that matches ``name``, or None."""
        return next((p for p in self.exclude if fnmatch.fnmatchcase(name, p)), None)

    def resolve(self, name: str) -> dict:
        """Role -> QuantizerConfig | None for layer ``name`` (last matching rule wins per role)."""
        out: dict = {role: None for role in ROLES}
        for rule in self.rules:
            if rule.matches(name):
                out.update(rule.roles)
        return out

    @property
    def needs_calibration_data(self) -> bool:
        """Whether a forward loop is needed: a static activation/output quantizer with an amax,
        or a calibration algorithm that reads activations (SmoothQuant, AWQ, GPTQ)."""
        if self.calib.needs_data:
            return True
        return any(
            cfg is not None and cfg.amax == "static" and cfg.build_format().needs_amax
            for rule in self.rules
            for role, cfg in rule.roles.items()
            if role != "weight"
        )


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(recipe: "str | dict | Recipe | Path") -> Recipe:
    """A Recipe from a built-in name, a YAML path, a mapping (e.g. a Hydra node) or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{recipe}.yaml"
        if not path.exists():
            raise ValueError(f"unknown recipe {recipe!r}; built-in recipes: {available_recipes()}")
    if not path.exists():
        raise ValueError(f"recipe file {str(path)!r} does not exist")
    with open(path) as f:
        data: Any = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {str(path)!r} must hold a mapping")
    return Recipe.from_dict(data)
