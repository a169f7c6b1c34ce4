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
(:mod:`megaquant.recipe_calib`; the passes run in :mod:`megaquant.calib.passes`)::

    calib: {algorithm: smoothquant, alpha: 0.5}   # max (default) | mse | smoothquant | awq | gptq
    calib: [{algorithm: smoothquant, search: true}, gptq]   # a chain, run in order

Its options are validated by the algorithm, and an algorithm that does not suit the recipe's
formats (SmoothQuant on a weight-only recipe, AWQ with quantized activations) is an error here,
at config time, naming the valid combinations.

An optional ``kv_cache:`` section (recipe version 3) quantizes the keys and values written into
the KV cache (:mod:`megaquant.recipe_kv`)::

    kv_cache: {format: fp8}                 # fp8 | nvfp4; scale: calibrated (default) | unit
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megaquant.formats import QuantFormat, get_format
from megaquant.recipe_calib import CalibConfig, check_recipe_roles
from megaquant.recipe_kv import KVCacheConfig
from megaquant.strict import check_keys

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
ROLES = ("input", "weight", "output")
AMAX_MODES = ("static", "dynamic")
DEFAULT_EXCLUDE = ["*output_layer*", "*router*"]


# ---------------------------------------------------------------------------- schema versions
# A recipe is stored in every checkpoint it made, and checkpoints compare recipes. Each change
# of the schema bumps RECIPE_VERSION and adds an upgrade from the previous version, so a recipe
# saved by an older megaquant still loads (and compares equal to its upgraded spelling).
#   1: the schema before versions (no ``version`` key)
#   2: ``version`` key added; nothing else changed
#   3: ``kv_cache`` (KV-cache quantization; default none); calibration algorithms
#      rotate_residual/rotate_heads/block_hadamard, gptq sequential/act_order, NVFP4
#      scale_rule 4over6
#      ``auto`` key (what the mixed-precision search chose and why; {} when hand-written)
#   4: calibration steps ``mse`` and ``gptq`` take ``modules`` (globs of the layers the step
#      runs on; default every quantized linear): a mixed recipe runs each group's algorithm
RECIPE_VERSION = 4


def _v1_to_v2(d: dict) -> dict:
    return {**d, "version": 2}


def _v2_to_v3(d: dict) -> dict:
    return {"kv_cache": None, **d, "version": 3, "auto": d.get("auto", {})}


def _v3_to_v4(d: dict) -> dict:
    return {**d, "version": 4}  # a step without ``modules`` runs on every layer, as before


# version -> function returning the next version
_UPGRADES = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}

# The ``auto`` header a mixed-precision search writes (megaquant.auto.search): data, not rules.
# Its keys are checked; the values are the search's report (budget, bits, scores per group).
AUTO_KEYS = ("formats", "budget_bits", "effective_bits", "score", "params", "groups")


def upgrade(d: dict) -> dict:
    """A recipe mapping of any known version, rewritten to the current schema."""
    if not isinstance(d, dict):
        raise ValueError(f"a recipe must be a mapping, got {type(d).__name__}")
    version = d.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= RECIPE_VERSION:
        raise ValueError(f"recipe {d.get('name', 'custom')!r}: unknown recipe version "
                         f"{version!r}; this megaquant reads versions 1..{RECIPE_VERSION} "
                         "(a newer megaquant wrote it: upgrade megaquant)")
    while version < RECIPE_VERSION:
        d = _UPGRADES[version](d)
        version += 1
    return d


def canonical_recipe(recipe: "dict | None") -> "dict | None":
    """``recipe`` parsed, upgraded and written back with every default: the form to compare."""
    return None if recipe is None else load_recipe(recipe).to_dict()


def _check_servable_block(fmt: QuantFormat) -> None:
    """Refuse block sizes no serving engine implements, at recipe time rather than at export.

    NVFP4 is defined with blocks of 16 (E4M3 scale per 16 values: Blackwell tensor cores,
    TensorRT-LLM, vLLM); INT4 group sizes in engines (Marlin/Machete, TensorRT-LLM) are powers
    of two (32, 64, 128). Fake quantization would accept any size, with a ragged last block, and
    the run would only fail at export.
    """
    name, block = type(fmt).__name__, getattr(fmt, "block_size", None)
    if name == "NVFP4" and block != 16:
        raise ValueError(f"NVFP4: block_size={block} is not servable: NVFP4 uses blocks of 16 "
                         "(Blackwell tensor cores, TensorRT-LLM, vLLM); use block_size: 16")
    if name == "INT4" and (block < 8 or block & (block - 1)):
        raise ValueError(f"INT4: block_size={block} is not servable: engines use power-of-two "
                         "group sizes (32, 64 or 128, dividing every input dimension); pick one "
                         "of those")


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor role is quantized: a format, its options, and its quantizer mode.

    ``mode`` is the recipe key ``amax``: ``static`` (calibrated once) or ``dynamic`` (from each
    tensor), the :class:`~megaquant.quantizer.TensorQuantizer` mode the role runs in.
    """

    format: str
    mode: str = "static"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in AMAX_MODES:
            raise ValueError(f"amax must be one of {AMAX_MODES}, got {self.mode!r}")
        _check_servable_block(self.build_format())  # format name and options checked now

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "QuantizerConfig":
        if not isinstance(d, dict) or "format" not in d:
            raise ValueError(f"{where}: expected a mapping with a 'format' key, got {d!r}")
        d = dict(d)
        fmt, mode = d.pop("format"), d.pop("amax", "static")
        try:
            return cls(format=fmt, mode=mode, options=d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from e

    def to_dict(self) -> dict:
        return {"format": self.format, "amax": self.mode, **self.options}

    def build_format(self) -> QuantFormat:
        return get_format(self.format, **self.options)


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

    def to_dict(self) -> dict:
        roles = {r: None if c is None else c.to_dict() for r, c in self.roles.items()}
        return {"modules": list(self.modules), **roles}


@dataclass(frozen=True)
class Recipe:
    """A named, validated list of rules plus the layers to leave alone."""

    name: str
    rules: tuple[Rule, ...]
    exclude: tuple[str, ...] = tuple(DEFAULT_EXCLUDE)
    description: str = ""
    calib: CalibConfig = field(default_factory=CalibConfig)
    version: int = RECIPE_VERSION
    kv_cache: KVCacheConfig | None = None
    auto: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.auto) - set(AUTO_KEYS))
        if unknown:
            raise ValueError(f"recipe {self.name!r} auto: unknown key(s) {unknown}; valid keys: "
                             f"{list(AUTO_KEYS)}")
        if not isinstance(self.calib, CalibConfig):
            raise TypeError(f"recipe {self.name!r}: calib must be a CalibConfig, got "
                            f"{type(self.calib).__name__}; use CalibConfig.from_dict(...)")
        try:
            check_recipe_roles(self.calib, self.roles())
        except ValueError as e:
            raise ValueError(f"recipe {self.name!r}: {e}") from e

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = upgrade(d)
        check_keys(d, cls, "recipe")
        name = d.get("name", "custom")
        rules = d.get("rules")
        if not rules and d.get("kv_cache") is None:  # a KV-cache-only recipe has no rules
            raise ValueError(f"recipe {name!r}: 'rules' must be a non-empty list (or empty "
                             "with a kv_cache section: KV-cache quantization alone)")
        return cls(
            name=name,
            rules=tuple(Rule.from_dict(r, f"recipe {name!r} rules[{i}]")
                        for i, r in enumerate(rules or ())),
            exclude=tuple(d.get("exclude", DEFAULT_EXCLUDE)),
            description=d.get("description", ""),
            calib=CalibConfig.from_dict(d.get("calib"), f"recipe {name!r} calib"),
            kv_cache=KVCacheConfig.from_dict(d.get("kv_cache"), f"recipe {name!r} kv_cache"),
            auto=dict(d.get("auto") or {}),
        )

    def to_dict(self) -> dict:
        """The recipe in the current schema, every default spelled out (what checkpoints store
        and compare: two spellings of one recipe give the same dict)."""
        return {"version": self.version, "name": self.name, "description": self.description,
                "rules": [r.to_dict() for r in self.rules], "exclude": list(self.exclude),
                "calib": self.calib.to_dict(),
                "kv_cache": None if self.kv_cache is None else self.kv_cache.to_dict(),
                "auto": self.auto}

    def is_excluded(self, name: str) -> str | None:
        """The exclude pattern that matches ``name``, or None."""
        return next((p for p in self.exclude if fnmatch.fnmatchcase(name, p)), None)

    def roles(self) -> list:
        """Every (role, QuantizerConfig) the recipe sets, the KV cache's ``k``/``v`` included:
        what a calibration algorithm is checked against."""
        roles = [(role, cfg) for rule in self.rules for role, cfg in rule.roles.items()]
        if self.kv_cache is not None:
            kv = QuantizerConfig(format=self.kv_cache.format)
            roles += [("k", kv), ("v", kv)]
        return roles

    def resolve(self, name: str) -> dict:
        """Role -> QuantizerConfig | None for layer ``name`` (last matching rule wins per role)."""
        out: dict = {role: None for role in ROLES}
        for rule in self.rules:
            if rule.matches(name):
                out.update(rule.roles)
        if self.kv_cache is not None:  # the k/v roles exist only in core attention layers
            kv = QuantizerConfig(format=self.kv_cache.format)
            out.update(k=kv, v=kv)
        return out


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
