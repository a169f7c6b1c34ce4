"""The mixed-precision search on the tiny GPT: a valid recipe within budget, the optimum of its
own scores, deterministic, equal under TP=2 and EP=2 to one process, and clear bad-input errors.

References: brute force over every assignment of the recorded scores (the knapsack's answer must
match it), a second run (bit-identical scores), the single-process scores (float64 sums of the
same float32 numbers in another order: rtol 1e-4), and exact candidate bit counts.
"""

import itertools

import pytest
import torch

from tests.distributed_utils import run_ranks
from tests.sharding import random_batches

FORMATS = ("nvfp4", "fp8", "none")


def _search(model, groups, bits=6.0, formats=FORMATS, compare=False, **kw):
    from megaquant.auto.search import AutoConfig, search
    from megaquant.evaluate import run_forward

    batches = random_batches(4, 1)
    calib = [b[:, :-1] for b in batches]
    return search(model, AutoConfig(formats=formats, effective_bits=bits, **kw),
                  lambda m: run_forward(m, calib, "calib", groups.dp_group), batches,
                  dp_group=groups.dp_group, tp_group=groups.tp_group, compare=compare)


def _tiny(full_state=None, tp=1, groups=None):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider
    from tests.sharding import shard_state_dict, tiny_full_state

    model = build_gpt_model(tiny_gpt_config(), get_spec_provider("local"), tp_size=tp)
    shard_state_dict(model, full_state or tiny_full_state(), 0 if groups is None
                     else groups.tp_rank, tp)
    return model


def test_search_recipe_is_the_optimum_of_its_scores_within_budget(megatron_single):
    import megaquant
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.recipe import load_recipe

    res = _search(_tiny(), megatron_single, compare=True)
    recipe = load_recipe(res.recipe)  # the strict parser accepts what the search wrote
    auto = recipe.auto
    assert auto["effective_bits"] <= 6.0 and auto["budget_bits"] == 6.0
    table = auto["groups"]
    assert len(table) == 8 and {"fisher", "output", "kl"} <= set(table[0]["scores"])
    params = sum(g["params"] for g in table)
    assert sum(g["bits"] * g["params"] for g in table) / params == pytest.approx(
        auto["effective_bits"], rel=1e-5)
    # Brute force over all 3^8 assignments of the recorded fisher scores.
    options = [{f: g["scores"]["fisher"][f] for f in FORMATS} for g in table]
    per_bit = {"nvfp4": None, "fp8": None, "none": 16.0}
    for g in table:  # recover each candidate's bits from the chosen ones of its kind
        per_bit[g["format"]] = per_bit[g["format"]] or g["bits"]
    assert all(v is not None for v in per_bit.values()), per_bit  # all three were chosen
    best = min(sum(table[i]["scores"]["fisher"][f] for i, f in enumerate(pick))
               for pick in itertools.product(FORMATS, repeat=len(table))
               if sum(per_bit[f] * table[i]["params"] for i, f in enumerate(pick))
               <= 6.0 * params * (1 - 2 / 256))
    got = sum(g["scores"]["fisher"][g["format"]] for g in table)
    assert got <= best + 1e-12, options
    # The sensitivity order is plausible: nvfp4 hurts more than fp8 in every group.
    assert all(g["scores"]["fisher"]["nvfp4"] > g["scores"]["fisher"]["fp8"] for g in table)
    assert all(g["scores"]["kl"]["nvfp4"] > g["scores"]["kl"]["fp8"] for g in table)
    # The recipe quantizes each group in the format chosen for it (the tiny model is random,
    # so its losses say nothing about quality: that comparison is the SmolLM2 benchmark's).
    model = _tiny()
    calib = [b[:, :-1] for b in random_batches(4, 1)]
    megaquant.quantize(model, res.recipe,
                       lambda m: run_forward(m, calib, "c", megatron_single.dp_group),
                       dp_group=megatron_single.dp_group)
    layers = dict(model.named_modules())
    for g in table:
        fmt = layers[g["modules"]].weight_quantizer.fmt
        assert (fmt.name if fmt is not None else "none") == g["format"], g["modules"]
    assert evaluate_loss(model, random_batches(2, 2), megatron_single.dp_group) > 0


def test_search_is_deterministic(megatron_single):
    a = _search(_tiny(), megatron_single)
    b = _search(_tiny(), megatron_single)
    assert a.recipe == b.recipe and a.scores == b.scores


def test_search_pin_fixes_a_group(megatron_single):
    res = _search(_tiny(), megatron_single, bits=5.0, formats=("nvfp4", "fp8"),
                  pin={"*layers.1.mlp.linear_fc2": "fp8"})
    chosen = {g["modules"]: g["format"] for g in res.recipe["auto"]["groups"]}
    assert chosen["decoder.layers.1.mlp.linear_fc2"] == "fp8"


@pytest.mark.parametrize("kw, message", [
    ({"bits": 4.0}, r"outside what candidates .* can reach on this model: 4\.50\d* \.\. 16"),
    ({"bits": 17.0}, r"outside what candidates"),
    ({"formats": ("nvfp4", "nvfp7")}, r"unknown: \['nvfp7'\]"),
    ({"formats": ("nvfp4", "nvfp4_sq")}, r"'smoothquant', which folds per-channel scales"),
    ({"formats": ("nvfp4_mrgptq", "fp8")}, r"'rotate_residual', which rotates the residual"),
    ({"score": "hessian"}, r"auto.score must be one of"),
])
def test_search_bad_input_names_the_range_or_choices(megatron_single, kw, message):
    with pytest.raises(ValueError, match=message):
        _search(_tiny(), megatron_single, **kw)


def test_search_candidate_algorithm_runs_on_the_groups_that_chose_it(megatron_single, tmp_path):
    """A GPTQ candidate is scored with its GPTQ weights and the written recipe runs GPTQ on the
    groups that chose it. References: the same model quantized with ``nvfp4_gptq`` alone (all 8
    linears fit one capture pass, so every GPTQ Hessian comes from the unquantized model, as
    in the search) and the recipe read back from YAML (bit-identical model)."""
    import yaml

    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.recipe import load_recipe

    formats = ("nvfp4", "nvfp4_gptq", "fp8", "none")
    res = _search(_tiny(), megatron_single, formats=formats, compare=True)
    table = res.recipe["auto"]["groups"]
    # GPTQ minimises each layer's output error on these very tokens: it must score below RTN.
    assert all(g["scores"]["output"]["nvfp4_gptq"] < g["scores"]["output"]["nvfp4"]
               for g in table)
    gptq_groups = [g["modules"] for g in table if g["format"] == "nvfp4_gptq"]
    assert gptq_groups and res.recipe["calib"] == [{"algorithm": "gptq", "modules": gptq_groups}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(res.recipe, sort_keys=False))
    assert load_recipe(str(path)).to_dict() == load_recipe(res.recipe).to_dict()

    calib = [b[:, :-1] for b in random_batches(4, 1)]
    loop = lambda m: run_forward(m, calib, "c", megatron_single.dp_group)  # noqa: E731
    models = {}
    for key, recipe in (("dict", res.recipe), ("yaml", str(path)), ("alone", "nvfp4_gptq")):
        models[key] = _tiny()
        megaquant.quantize(models[key], recipe, loop, dp_group=megatron_single.dp_group)
    from_yaml = models["yaml"].state_dict()
    for k, v in models["dict"].state_dict().items():  # None: Megatron's empty extra state
        assert (v is None and from_yaml[k] is None) or torch.equal(v, from_yaml[k]), k
    original = _tiny().state_dict()
    mixed, alone = models["dict"].state_dict(), models["alone"].state_dict()
    for g in table:
        key = g["modules"] + ".weight"
        want = alone[key] if g["format"] == "nvfp4_gptq" else original[key]
        assert torch.equal(mixed[key], want), (g["modules"], g["format"])


def test_kl_score_replayed_prefix_equals_full_forwards(megatron_single):
    """The KL score skips the unquantized blocks before each group (their recorded output is
    replayed) and sums ``p log p - p log q`` in token chunks; reference: the full forward of
    every choice and ``p (log p - log q)`` at once, as the score was first written (float64
    rounding apart: the two sums of ~|log p| ~ 5.5 per token round to ~1e-15, so atol 1e-15;
    the tiny random model's KL is ~1e-7)."""
    from megaquant.auto.groups import find_groups
    from megaquant.auto.score import _positions, _vocab_log_softmax, kl_scores, quantized
    from megaquant.auto.search import AutoConfig, _calibrate_candidates, _candidates
    from megaquant.evaluate import run_forward

    model, batches = _tiny(), random_batches(2, 3)
    cfg = AutoConfig(formats=("nvfp4_gptq", "fp8", "none"), effective_bits=6.0)
    calib = [b[:, :-1] for b in batches]
    snaps, _, converted = _calibrate_candidates(
        model, _candidates(cfg), lambda m: run_forward(m, calib, "c", megatron_single.dp_group),
        megatron_single.dp_group)
    groups = find_groups(model, converted)
    got = kl_scores(model, groups, snaps, batches, megatron_single.dp_group, None)
    want = torch.zeros_like(got)
    with torch.no_grad():
        for tokens in batches:
            x = tokens[:, :-1]
            logp = _vocab_log_softmax(model(x, _positions(x), None), None)
            for gi, g in enumerate(groups):
                for ci, state in enumerate(snaps[:2]):
                    with quantized([(layer, state[n]) for n, layer in g.layers]):
                        logq = _vocab_log_softmax(model(x, _positions(x), None), None)
                    want[gi, ci] += (logp.exp() * (logp - logq)).sum() / (len(batches) * x.numel())
    assert (got[:, :2] > 0).all() and (got[:, 2] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)


def _capture(layers):
    """Hooks keeping (input, output, output grad) of each layer for one batch."""
    cache, handles = {}, []

    def hook(name):
        def fn(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            entry = cache.setdefault(name, {})
            entry["x"], entry["y"] = args[0].detach(), y.detach()
            y.register_hook(lambda g: entry.__setitem__("dy", g.detach()))
        return fn

    for name, layer in layers:
        handles.append(layer.register_forward_hook(hook(name)))
    return cache, handles


def test_fisher_and_output_scores_match_a_float64_reference(megatron_single):
    """The scores take activation gradients only and sum in float32: reference, the plain
    float64 computation with a full backward (parameter gradients on), rtol 1e-5."""
    from megaquant.auto.groups import find_groups
    from megaquant.auto.score import _positions, layer_scores, quantized
    from megaquant.auto.search import AutoConfig, _calibrate_candidates, _candidates
    from megaquant.evaluate import run_forward

    model, batches = _tiny(), random_batches(2, 3)
    cfg = AutoConfig(formats=("nvfp4", "fp8_per_channel", "none"), effective_bits=6.0)
    calib = [b[:, :-1] for b in batches]
    snaps, _, converted = _calibrate_candidates(
        model, _candidates(cfg), lambda m: run_forward(m, calib, "c", megatron_single.dp_group),
        megatron_single.dp_group)
    groups = find_groups(model, converted)
    got = layer_scores(model, groups, snaps, batches, megatron_single.dp_group)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    sums = torch.zeros(len(groups), 2, 3, dtype=torch.float64)
    for tokens in batches:
        x, labels = tokens[:, :-1], tokens[:, 1:]
        cache, handles = _capture([(n, m) for g in groups for n, m in g.layers])
        model(x, _positions(x), None, labels=labels).float().sum().backward()
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for gi, g in enumerate(groups):
                for name, layer in g.layers:
                    e = cache[name]
                    y, dy = e["y"].double(), e["dy"].double()
                    for ci in range(2):
                        with quantized([(layer, snaps[ci][name])]):
                            d2 = (layer(e["x"])[0].double() - y) ** 2
                        sums[gi, ci] += torch.stack([(dy ** 2 * d2).sum(), d2.sum(),
                                                     (y ** 2).sum()])
    want = torch.stack([0.5 * sums[..., 0], sums[..., 1] / sums[..., 2]], dim=-1)
    torch.testing.assert_close(got[:, :2], want, rtol=1e-5, atol=0)
    assert (got[:, 2] == 0).all() and (want > 0).all()


def _tp2_scores(full):
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=200)
    groups = init_model_parallel(tp=2)
    res = _search(_tiny(full, 2, groups), groups, compare=True)
    return res.recipe, res.scores


def _ep2_scores(full):
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model, tiny_moe_config
    from megaquant.spec import get_spec_provider
    from tests.moe.moe_helpers import load_sharded

    init_distributed(timeout_s=200)
    groups = init_model_parallel(tp=1, ep=2)
    model = build_gpt_model(tiny_moe_config(), get_spec_provider("local"), tp_size=1, ep_size=2)
    load_sharded(model, full, 0, 1, groups.ep_rank, 2)
    res = _search(model, groups, compare=True)
    return res.recipe, res.scores


def _assert_same_search(got, want):
    (recipe, scores), (want_recipe, want_scores) = got, want
    for name in want_scores:
        torch.testing.assert_close(torch.tensor(scores[name]), torch.tensor(want_scores[name]),
                                   rtol=1e-4, atol=1e-12, msg=name)
    assert recipe["rules"] == want_recipe["rules"]
    assert recipe["auto"]["effective_bits"] == want_recipe["auto"]["effective_bits"]


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_search_tp2_and_ep2_decide_as_one_process(megatron_single):
    from megaquant.models.gpt import build_gpt_model, tiny_moe_config
    from megaquant.spec import get_spec_provider
    from tests.moe.moe_helpers import full_moe_state
    from tests.sharding import tiny_full_state

    full = tiny_full_state()
    ref = _search(_tiny(full), megatron_single, compare=True)
    for rank_result in run_ranks(_tp2_scores, 2, (full,), timeout_s=400):
        _assert_same_search(rank_result, (ref.recipe, ref.scores))
    moe_full = full_moe_state(tiny_moe_config())
    model = build_gpt_model(tiny_moe_config(), get_spec_provider("local"), tp_size=1)
    model.load_state_dict(moe_full, strict=False)
    moe_ref = _search(model, megatron_single, compare=True)
    expert_groups = [g for g in moe_ref.recipe["auto"]["groups"]
                     if g["modules"].endswith("experts.*")]
    assert len(expert_groups) == 2  # all experts of a layer (fc1 and fc2) are one choice
    for rank_result in run_ranks(_ep2_scores, 2, (moe_full,), timeout_s=400):
        _assert_same_search(rank_result, (moe_ref.recipe, moe_ref.scores))


def test_search_candidates_the_layouts_cannot_mix_are_refused(monkeypatch):
    from megaquant.export import modelopt_layout
    from megaquant.jobs.ptq import check_exportable_mix

    check_exportable_mix(("nvfp4", "fp8_per_channel", "none"))  # compressed-tensors holds both
    # Were compressed-tensors unable to write NVFP4, nothing could hold this pair.
    from megaquant.export import ct_layout

    monkeypatch.delitem(ct_layout.DTYPES, "nvfp4")
    assert "fp8_per_channel" in modelopt_layout.REFUSED
    with pytest.raises(ValueError, match=r"no export layout writes all of them"):
        check_exportable_mix(("nvfp4", "fp8_per_channel"))
