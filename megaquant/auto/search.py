"""The mixed-precision search: calibrate each candidate, score every choice, solve, write a recipe.

    cfg = AutoConfig(formats=("nvfp4", "fp8"), effective_bits=5.0)
    result = search(model, cfg, forward_loop, batches, dp_group=..., tp_group=...)
    result.recipe      # a recipe mapping (version 4): one rule per layer group, ``auto:`` header

Candidates are built-in recipe names (their rules give each layer its weight/input/output
configs, their ``calib:`` the algorithm) or ``none`` (unquantized, 16 bits, score 0). Each
candidate is calibrated once over the whole model with its own algorithm; its quantizer state
(and the weights its algorithm rewrote) is kept per layer, the original weights are put back,
every quantizer is switched off, and the scores of :mod:`megaquant.auto.score` are taken with
one group at a time in one candidate.

A candidate's algorithm must be layer-local (:data:`LAYER_LOCAL`): it rewrites only the weights
(and pins the weight amax) of the layers it quantizes, so a group in that candidate is the same
whatever the other groups chose, and the written recipe runs each candidate's steps on the
groups that chose it, in one ``calib:`` chain (``{algorithm: gptq, modules: [...]}``). GPTQ
steps come first: with every chosen layer in one capture pass (``layers_per_pass``) they see
the unquantized model's inputs, as when the candidate was scored. Algorithms that fold scales
into another layer or transform the whole model are refused with the reason
(:data:`NOT_LAYER_LOCAL`). :mod:`megaquant.auto.knapsack` picks the assignment with the
least summed score whose weight bits (:mod:`megaquant.auto.bits`) fit ``effective_bits`` times
the parameters of the quantized linears. Deterministic: scores are summed over the job in a
fixed order, every rank solves the same problem, and ties go to the earlier candidate.

After ``search`` the model is converted with every quantizer off; quantize it with the recipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megaquant.auto import knapsack
from megaquant.auto.bits import weight_bits
from megaquant.auto.groups import find_groups
from megaquant.auto.score import SCORES, LayerState, apply_state, kl_scores, layer_scores
from megaquant.recipe import RECIPE_VERSION, ROLES, available_recipes, load_recipe

UNQUANTIZED = "none"
# Calibration algorithms a candidate may carry, in the order the written recipe runs them.
LAYER_LOCAL = ("gptq", "mse")
_FOLDS = ("folds per-channel scales into the producer of a layer's input (a norm, fc1's up rows, "
          "qkv's V rows): the producer is another group's weight, so the score would not be the "
          "layer's alone and two candidates' folds would not compose")
NOT_LAYER_LOCAL = {
    "smoothquant": _FOLDS,
    "awq": _FOLDS,
    "rotate_residual": "rotates the residual stream of the whole model (embeddings, norms, every "
                       "layer): a model-wide transform, not a per-group choice",
    "rotate_heads": "rotates the heads of every attention layer: a model-wide transform",
    "block_hadamard": "adds an online transform the layer runs before its input quantizer, which "
                      "only one export layout writes; not offered as a candidate yet",
}


@dataclass(frozen=True)
class AutoConfig:
    """What the search may choose and how it judges (job key ``auto``)."""

    formats: tuple = ()              # candidate recipes, e.g. ("nvfp4", "fp8", "none")
    effective_bits: float = 0.0      # weight bits per parameter of the quantized linears
    score: str = "fisher"            # fisher | output | kl: what the knapsack minimises
    kl_batches: int = 2              # batches the KL score reads (one forward per choice each)
    pin: dict = field(default_factory=dict)  # module glob -> candidate: fixed, not searched
    resolution: int = 256            # knapsack grid units per group (see knapsack.py)

    def __post_init__(self):
        object.__setattr__(self, "formats", tuple(self.formats))
        valid = [*available_recipes(), UNQUANTIZED]
        unknown = [f for f in self.formats if f not in valid]
        if len(self.formats) < 2 or unknown:
            raise ValueError(f"auto.formats: give at least two candidates from {valid}"
                             + (f"; unknown: {unknown}" if unknown else ""))
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"auto.formats: {list(self.formats)} names a candidate twice")
        if self.score not in SCORES:
            raise ValueError(f"auto.score must be one of {SCORES}, got {self.score!r}")
        bad_pins = {k: v for k, v in self.pin.items() if v not in self.formats}
        if bad_pins:
            raise ValueError(f"auto.pin {bad_pins}: a pinned layer takes one of the candidates "
                             f"{list(self.formats)}")


@dataclass
class SearchResult:
    recipe: dict
    scores: dict        # score name -> [G][C]
    seconds: dict       # calibration per candidate, scoring, solving


def _candidates(cfg: AutoConfig) -> list:
    out = []
    for name in cfg.formats:
        if name == UNQUANTIZED:
            out.append(None)
            continue
        r = load_recipe(name)
        for step in r.calib.steps:
            _check_layer_local(name, step)
        out.append(r)
    excludes = {r.exclude for r in out if r is not None}
    if len(excludes) > 1:
        raise ValueError(f"auto.formats: candidates exclude different layers {sorted(excludes)}; "
                         "the export layouts need one set of unquantized layers")
    return out


def _check_layer_local(name: str, step) -> None:
    """Refuse a candidate's calibration step that a mixed recipe cannot run per group."""
    algo = step.algorithm
    if algo in NOT_LAYER_LOCAL:
        raise ValueError(f"auto.formats: candidate {name!r} calibrates with {algo!r}, which "
                         f"{NOT_LAYER_LOCAL[algo]}. Candidates may carry layer-local algorithms "
                         f"only ({', '.join(LAYER_LOCAL)}; max), e.g. nvfp4_gptq, nvfp4_mse")
    if algo == "gptq" and step.build_options().sequential:
        raise ValueError(f"auto.formats: candidate {name!r} runs sequential GPTQ, whose Hessians "
                         "come from the prefix quantized in the same recipe; in a mixed model "
                         "that prefix is other candidates', so the scored weights would not be "
                         "the final ones. Use GPTQ with sequential: false (nvfp4_gptq)")
    if "modules" in step.options:
        raise ValueError(f"auto.formats: candidate {name!r}'s {algo} step names its own modules "
                         f"{step.options['modules']}; the search decides which groups run it")


def _snapshot(model, names, keep_weights: bool) -> dict:
    """layer name -> LayerState of the current configuration (and weights, if rewritten)."""
    layers = dict(model.named_modules())
    return {n: LayerState(
        {q: (quant.fmt, quant.mode, quant.amax.clone() if quant.has_amax else None)
         for q, _, quant in layers[n].quantizers() if quant.is_enabled},
        _weight_copy(layers[n]) if keep_weights else None)
        for n in names}


def _weight_copy(layer):
    w = getattr(layer, "weight", None)
    return None if w is None else w.detach().clone()


def _calibrate_candidates(model, recipes, forward_loop, dp_group):
    from megaquant.ptq import quantize

    snapshots, seconds, converted = [], {}, None
    rewrites = [r is not None and r.calib.name != "max" for r in recipes]
    # Each candidate's algorithm starts from the original weights (layer-local algorithms
    # rewrite linear weights only; everything is put back, which costs one copy of the model).
    originals = [(p, p.detach().clone()) for p in model.parameters()] if any(rewrites) else []
    for r, rewrote in zip(recipes, rewrites):
        if r is None:
            snapshots.append(None)
            continue
        t0 = time.perf_counter()
        report = quantize(model, r, forward_loop, dp_group=dp_group)
        seconds[f"calibrate_{r.name}"] = time.perf_counter() - t0
        converted = report.converted
        snapshots.append(_snapshot(model, converted, keep_weights=rewrote))
        with torch.no_grad():
            for p, w in originals:
                p.copy_(w)
    for _, m in model.named_modules():
        if hasattr(m, "quantizers"):
            apply_state(m, None)
    return snapshots, seconds, converted


def _role_configs(recipe, layer_name: str) -> dict:
    """role -> recipe mapping (or None) that candidate ``recipe`` gives ``layer_name``."""
    if recipe is None:
        return {role: None for role in ROLES}
    return {role: None if c is None else c.to_dict()
            for role, c in recipe.resolve(layer_name).items()}


def _costs(groups, recipes) -> list:
    """[G][C] weight bits of each group in each candidate."""
    out = []
    for g in groups:
        name = g.layers[0][0]
        row = []
        for r in recipes:
            w = None if r is None else r.resolve(name)["weight"]
            fmt = None if w is None else w.build_format()
            row.append(sum(weight_bits(fmt, rows, cols) for rows, cols in g.shapes))
        out.append(row)
    return out


def _pinned(cfg: AutoConfig, groups, costs, scores) -> None:
    """Pinned groups keep only their pinned candidate (the others cost infinitely much)."""
    import fnmatch

    for gi, g in enumerate(groups):
        pins = [c for pat, c in cfg.pin.items() if fnmatch.fnmatchcase(g.key, pat)]
        if pins:
            keep = cfg.formats.index(pins[-1])
            scores[gi] = [s if ci == keep else float("inf") for ci, s in enumerate(scores[gi])]


def _check_budget(cfg: AutoConfig, costs, params: int) -> None:
    lo = sum(min(c) for c in costs) / params
    hi = sum(max(c) for c in costs) / params
    if not lo - 1e-9 <= cfg.effective_bits <= hi + 1e-9:
        raise ValueError(f"auto.effective_bits={cfg.effective_bits} is outside what candidates "
                         f"{list(cfg.formats)} can reach on this model: {lo:.4f} .. {hi:.4f} "
                         "bits per weight (element and scale bits of the quantized linears)")


def search(model, cfg: AutoConfig, forward_loop, batches, *, dp_group, tp_group=None,
           compare: bool = False) -> SearchResult:
    """Choose a candidate per layer group; see the module docstring.

    ``forward_loop(model)``: calibration forwards (as for :func:`megaquant.quantize`);
    ``batches``: ``[b, s+1]`` token tensors the scores read (split over ``dp_group``);
    ``tp_group``: the output layer's vocabulary split (KL score). ``compare``: compute all
    three scores (else the chosen one only), for the comparison table.
    """
    recipes = _candidates(cfg)
    snapshots, seconds, converted = _calibrate_candidates(model, recipes, forward_loop, dp_group)
    groups = find_groups(model, converted)
    t0 = time.perf_counter()
    scores = {}
    if compare or cfg.score != "kl":
        both = layer_scores(model, groups, snapshots, batches, dp_group)
        scores["fisher"], scores["output"] = both[..., 0].tolist(), both[..., 1].tolist()
    if compare or cfg.score == "kl":
        scores["kl"] = kl_scores(model, groups, snapshots, batches[: cfg.kl_batches], dp_group,
                                 tp_group).tolist()
    seconds["score"] = time.perf_counter() - t0
    costs = _costs(groups, recipes)
    params = sum(rows * cols for g in groups for rows, cols in g.shapes)
    _check_budget(cfg, costs, params)
    chosen_scores = [list(row) for row in scores[cfg.score]]
    _pinned(cfg, groups, costs, chosen_scores)
    t0 = time.perf_counter()
    choice = knapsack.solve(costs, chosen_scores, cfg.effective_bits * params, cfg.resolution)
    seconds["solve"] = time.perf_counter() - t0
    recipe = _write_recipe(cfg, groups, recipes, costs, scores, choice, params)
    return SearchResult(recipe=recipe, scores=scores, seconds=seconds)


def _write_recipe(cfg, groups, recipes, costs, scores, choice, params) -> dict:
    bits = sum(costs[gi][c] for gi, c in enumerate(choice)) / params
    first = next(r for r in recipes if r is not None)
    rules, table = [], []
    for gi, (g, c) in enumerate(zip(groups, choice)):
        rules.append({"modules": g.pattern, **_role_configs(recipes[c], g.layers[0][0])})
        n = sum(rows * cols for rows, cols in g.shapes)
        table.append({"modules": g.pattern, "format": cfg.formats[c], "params": n,
                      "bits": round(costs[gi][c] / n, 6),
                      "scores": {k: {f: float(v[gi][ci]) for ci, f in enumerate(cfg.formats)}
                                 for k, v in scores.items()}})
    out = {
        "version": RECIPE_VERSION,
        "name": f"auto_{'_'.join(cfg.formats)}_{cfg.effective_bits:g}b",
        "description": f"mixed precision from {list(cfg.formats)} at {bits:.3f} effective "
                       f"weight bits (budget {cfg.effective_bits:g}), score {cfg.score}",
        "rules": rules,
        "exclude": list(first.exclude),
        "auto": {"formats": list(cfg.formats), "budget_bits": float(cfg.effective_bits),
                 "effective_bits": round(bits, 6), "score": cfg.score, "params": params,
                 "groups": table},
    }
    calib = _calib_steps(groups, recipes, choice)
    if calib:
        out["calib"] = calib
    return out


def _calib_steps(groups, recipes, choice) -> list:
    """Each chosen candidate's calibration steps, restricted to the groups that chose it.

    GPTQ steps first, then MSE (:data:`LAYER_LOCAL`): GPTQ reads activations, and with MSE's
    block clipping not yet applied its Hessians are those of the unquantized model, as when
    the candidate was scored; candidates keep their order within an algorithm.
    """
    steps = []
    for algo in LAYER_LOCAL:
        for ci, r in enumerate(recipes):
            modules = [g.pattern for g, c in zip(groups, choice) if c == ci]
            if r is None or not modules:
                continue
            steps += [{"algorithm": algo, **s.options, "modules": modules}
                      for s in r.calib.steps if s.algorithm == algo]
    return steps
