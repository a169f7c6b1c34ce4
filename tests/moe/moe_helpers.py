"""Helpers for the MoE tests: distinct expert weights, EP/TP sharding by hand, global amax views.

The reference is always the EP=1, TP=1 model with the same weights. Sharding is done here by
hand (independent of Megatron's checkpoint resharding): expert ``e`` of the full model goes to
EP rank ``e // local`` as local expert ``e % local``, then through ``tests.sharding``'s TP split.
Amax values are returned under *global* expert names, TP-sharded per-channel ones gathered, so
every layout can be compared with the reference key by key.
"""

from __future__ import annotations

import re

import torch

SEQ = 16  # inputs of 16 tokens: divisible by TP=2 under sequence parallelism
RECIPES = ("fp8_per_channel", "nvfp4")
EMPTY_EXPERT = 3  # the expert the forced router never picks
_LOCAL = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")


def batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, SEQ + 1), generator=g) for _ in range(n)]


def full_moe_state(cfg) -> dict:
    """The EP=1 state of ``cfg``, every expert with its own weights.

    CPU initialisation gives each EP rank's experts the same weights, so a test that kept them
    would not notice experts being mixed up; each expert gets a different scale and noise.
    """
    from megaquant.models.gpt import build_gpt_model

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_gpt_model(cfg, tp_size=1, ep_size=1).state_dict()
             .items() if isinstance(v, torch.Tensor)}
    g = torch.Generator().manual_seed(7)
    for k, v in state.items():
        m = _LOCAL.search(k)
        if m and v.is_floating_point() and not k.endswith("_extra_state"):
            e = int(m.group(2))
            state[k] = v * (0.5 + 0.5 * e) + 0.01 * torch.randn(v.shape, generator=g)
    return state


def global_name(name: str, ep_rank: int, num_local: int) -> str:
    """``...local_experts.<local>.`` -> ``...local_experts.<global>.`` (EP rank offset)."""
    return _LOCAL.sub(lambda m: f"{m.group(1)}{ep_rank * num_local + int(m.group(2))}{m.group(3)}",
                      name)


def load_sharded(model, full_state, tp_rank: int, tp: int, ep_rank: int, num_local: int) -> None:
    """Copy the EP=1/TP=1 ``full_state`` into this rank's experts and TP shards."""
    from tests.sharding import shard_state_dict

    renamed = {}
    for name in model.state_dict():
        src = global_name(name, ep_rank, num_local)
        if src in full_state:
            renamed[name] = full_state[src]
    shard_state_dict(model, renamed, tp_rank, tp)


def force_empty_expert(model, expert: int = EMPTY_EXPERT) -> None:
    """Make every router's logit for global ``expert`` -inf-ish: it never receives a token."""
    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            original = module.gating

            def gating(x, original=original):
                logits = original(x).clone()
                logits[..., expert] = -1e9
                return logits

            module.gating = gating


def global_amax(model, ep_rank: int, num_local: int) -> dict:
    """Every amax under global expert names, TP-sharded per-channel ones all-gathered."""
    from tests.sharding import unsharded_amax

    return unsharded_amax(model, lambda name: global_name(name, ep_rank, num_local))


def quantize_layout(groups, cfg, full_state, recipe: str, *, empty_expert: bool = False,
                    share: bool = False) -> dict:
    """Build ``cfg`` at the current layout, load the shared weights, quantize, evaluate."""
    from megaquant.calib.calibrate import calibrate
    from megaquant.convert import apply_recipe, convert_model
    from megaquant.evaluate import evaluate_loss, run_forward
    from megaquant.models.gpt import build_gpt_model
    from megaquant.recipe import load_recipe
    from megaquant.spec import get_spec_provider

    num_local = cfg.num_moe_experts // groups.ep
    model = build_gpt_model(cfg, get_spec_provider("local"), tp_size=groups.tp, ep_size=groups.ep)
    load_sharded(model, full_state, groups.tp_rank, groups.tp, groups.ep_rank, num_local)
    if empty_expert:
        force_empty_expert(model)
    calib = [b[:, :-1] for b in batches(4, 1)]  # 4 batches: the same count on every DP rank
    rec = load_recipe(recipe)
    apply_recipe(model, rec, convert_model(model, rec))
    report = calibrate(model, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group, share_expert_inputs=share)
    return {"loss": evaluate_loss(model, batches(2, 2), groups.dp_group),
            "amax": global_amax(model, groups.ep_rank, num_local), "report": report,
            "model": model}


def merge_ranks(per_rank: list[dict]) -> dict:
    """One global amax dict from every rank's; keys seen on several ranks must agree exactly."""
    merged = {}
    for amaxes in per_rank:
        for k, v in amaxes.items():
            if k in merged:
                assert torch.equal(merged[k], v), f"ranks disagree on {k}"
            merged[k] = v
    return merged
