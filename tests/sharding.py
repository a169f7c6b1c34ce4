"""Shard a TP=1 Megatron state dict into a tensor-parallel model by hand (the test reference).

Independent of Megatron's own checkpoint resharding: contiguous chunks along the dimension that
differs in size, and SwiGLU's fc1 split as [gate_r; up_r] as Megatron lays it out.
"""

import torch


def shard_state_dict(model, full_state, tp_rank: int, tp: int) -> None:
    """Copy ``full_state`` (TP=1 names and shapes) into ``model``'s TP shards, in place."""
    own = model.state_dict()
    for name, shard in own.items():
        if (not isinstance(shard, torch.Tensor) or name.endswith("_extra_state")
                or name not in full_state):
            continue
        shard.copy_(shard_of(name, full_state[name], shard.shape, tp_rank, tp))


def shard_of(name: str, full: torch.Tensor, shape, tp_rank: int, tp: int) -> torch.Tensor:
    """Rank ``tp_rank``'s ``shape``-sized shard of the TP=1 tensor ``full`` called ``name``."""
    if full.shape == shape:
        return full
    dim = next(d for d in range(full.dim()) if full.shape[d] == tp * shape[d])
    if "linear_fc1" in name:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim)[tp_rank], up.chunk(tp, dim)[tp_rank]], dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def unsharded_amax(model, rename=lambda name: name) -> dict:
    """Every calibrated amax of ``model``, TP-sharded per-channel ones all-gathered over the
    layer's own TP group (SwiGLU fc1 rows re-ordered from per-rank [gate_r; up_r] to
    [gate; up]), keyed by ``rename(<layer>.<quantizer>)``: comparable with a TP=1 model."""
    import torch.distributed as dist

    from megaquant.calib.sync import sharded_amax_axis
    from megaquant.nn.base import QuantModuleMixin

    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantModuleMixin):
            continue
        group = layer.tp_group
        for qname, role, q in layer.quantizers():
            if not q.has_amax:
                continue
            amax = q.amax
            axis = sharded_amax_axis(q.fmt, layer.partition_axes.get(role), amax.dim())
            if axis is not None and dist.get_world_size(group) > 1:
                parts = [torch.empty_like(amax) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, amax.contiguous(), group=group)
                if "linear_fc1" in name and axis == 0:
                    halves = [p.chunk(2, dim=0) for p in parts]
                    parts = [h[0] for h in halves] + [h[1] for h in halves]
                amax = torch.cat(parts, dim=axis)
            out[rename(f"{name}.{qname}")] = amax.clone()
    return out


TWO_RANK_LAYOUTS = (("tp2", 2, False), ("tp2_sp", 2, True), ("dp2", 1, False))  # (name, tp, sp)


def random_batches(n: int, seed: int, seq: int = 16) -> list[torch.Tensor]:
    """``n`` batches of 2 x (seq + 1) token ids of the tiny GPT's 256-token vocabulary (inputs
    and next-token labels), drawn from their own generator so every rank and layout sees them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, seq + 1), generator=g) for _ in range(n)]


def tiny_full_state(seed: int = 0, rotatable: bool = False) -> dict:
    """The TP=1 state dict of a freshly seeded tiny GPT: the weights every layout starts from.

    ``rotatable``: the tied-embedding variant with non-trivial norm gammas (0.5..1.5), so the
    rotation tests exercise folding the norms into the linears."""
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(seed)
    model = build_gpt_model(tiny_gpt_config(tie_embeddings=rotatable), tp_size=1)
    if rotatable:
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.data.copy_(0.5 + torch.rand(p.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def quantized_tiny_shard(groups, tp: int, sp: bool, full_state: dict, recipe, calib):
    """This rank's TP shard of the tiny GPT holding ``full_state``, quantized with ``recipe``
    (calibrated on ``calib`` over the DP group): what each layout of a TP test compares."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider

    model = build_gpt_model(tiny_gpt_config(), get_spec_provider("local"), tp_size=tp,
                            sequence_parallel=sp)
    shard_state_dict(model, full_state, groups.tp_rank, tp)
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group)
    return model


def on_two_rank_layouts(quantize_all, full_state) -> dict:
    """Per rank of a 2-rank ``run_ranks``: ``quantize_all(groups, tp, sp, full_state)`` at TP=2,
    TP=2 with sequence parallelism, then DP=2 (one spawn for all three), keyed by layout."""
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed(timeout_s=120)
    return {layout: quantize_all(init_model_parallel(tp=tp), tp, sp, full_state)
            for layout, tp, sp in TWO_RANK_LAYOUTS}
