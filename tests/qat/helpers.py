"""Shared by the QAT tests: the tiny model, its data, and a training run at any layout.

Every layout starts from the same TP=1 weights (sharded by hand with tests.sharding), the
same random token windows and the same calibration batches, so a TP=2 or DP=2 run can be
compared with the single-process run step by step.
"""

import torch

SEQ = 16
RECIPE = "nvfp4"


def windows(n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SEQ + 1), generator=g)


def eval_batches():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 256, (2, SEQ + 1), generator=g) for _ in range(2)]


def full_state(seed=0):
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    torch.manual_seed(seed)
    model = build_gpt_model(tiny_gpt_config(), tp_size=1)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def build(groups, full, recipe=RECIPE, calibrate=True, scales=None):
    """The tiny GPT at this layout with ``full`` weights, quantized with ``recipe`` (or None).

    ``scales``: a LearnableScalesConfig to enable after quantization (None: fixed scales)."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider
    from tests.sharding import shard_state_dict

    model = build_gpt_model(tiny_gpt_config(), get_spec_provider("local"), tp_size=groups.tp)
    shard_state_dict(model, full, groups.tp_rank, groups.tp)
    if recipe is not None and calibrate:
        calib = [w[:, :-1] for w in windows(4, seed=5).split(2)]
        megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                           dp_group=groups.dp_group)
    elif recipe is not None:
        megaquant.ptq.restore(model, recipe)
    if scales is not None:
        from megaquant.train.learnable import enable_learnable_scales

        enable_learnable_scales(model, scales)
    return model


def settings(max_steps=4, distill=False):
    from megaquant.train.config import (
        BatchConfig,
        DistillConfig,
        OptimConfig,
        SchedConfig,
        TrainerConfig,
    )

    trainer = TrainerConfig(max_steps=max_steps, log_every_n_steps=0, gradient_clip_val=1.0)
    optim = OptimConfig(lr=3e-3, weight_decay=0.01, sched=SchedConfig(warmup_steps=1,
                                                                      min_lr=3e-4))
    return trainer, optim, BatchConfig(4, 2), DistillConfig(enabled=distill, kl_weight=1.0,
                                                            lm_weight=0.5, temperature=2.0)


def train_run(groups, full, *, steps=4, distill=False, start=0, stop_after=None, model=None,
              optimizer=None, scales=None):
    """Train the tiny model; returns (model, optimizer, per-step losses)."""
    model = model if model is not None else build(groups, full, scales=scales)
    teacher = None
    if distill:
        teacher = build(groups, full, recipe=None)
        teacher.requires_grad_(False)
    optimizer, recs = train_records(groups, model, optimizer, steps=steps, distill=distill,
                                    teacher=teacher, start=start, stop_after=stop_after,
                                    scale_lr_scale=scales.lr_scale if scales else 1.0)
    return model, optimizer, [r["loss"] for r in recs]


def train_records(groups, model, optimizer=None, *, steps=4, distill=False, teacher=None,
                  start=0, stop_after=None, scale_lr_scale=1.0):
    """Train ``model`` (any layout, expert groups included); returns (optimizer, records)."""
    from megaquant.train.loop import train
    from megaquant.train.optim import build_optimizer
    from megaquant.train.step import StepContext

    trainer, optim, batch, dist_cfg = settings(steps, distill)
    optimizer = optimizer if optimizer is not None else build_optimizer(model, optim,
                                                                        scale_lr_scale)
    ctx = StepContext(windows(), batch, groups.dp_group, groups.tp_group, dist_cfg, teacher,
                      trainer.gradient_clip_val).with_expert_groups(groups)
    recs = train(model, optimizer, ctx, trainer=trainer, optim=optim, start_step=start,
                 stop_after=stop_after)
    return optimizer, recs


# ------------------------------------------------------------------------------ MoE (EP)
def moe_config():
    from megaquant.models.gpt import tiny_moe_config

    return tiny_moe_config(moe_token_dispatcher="alltoall")


def full_moe_state():
    """EP=1 weights of the tiny MoE, every expert distinct (tests.moe.moe_helpers)."""
    from tests.moe.moe_helpers import full_moe_state as full

    return full(moe_config())


def full_moe_state_seeded(seed):
    """Other weights of the same shapes: a model that must get everything from a checkpoint."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in full_moe_state().items()}


def build_moe(groups, full, recipe=RECIPE, calibrate=True, empty_expert=False, scales=None):
    """The tiny MoE at this TP x EP layout with ``full`` weights, quantized with ``recipe``.

    ``empty_expert``: the routers never pick expert ``tests.moe.moe_helpers.EMPTY_EXPERT``.
    """
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import build_gpt_model
    from megaquant.spec import get_spec_provider
    from tests.moe.moe_helpers import force_empty_expert, load_sharded

    cfg = moe_config()
    model = build_gpt_model(cfg, get_spec_provider("local"), tp_size=groups.tp, ep_size=groups.ep)
    load_sharded(model, full, groups.tp_rank, groups.tp, groups.ep_rank,
                 cfg.num_moe_experts // groups.ep)
    if empty_expert:
        force_empty_expert(model)
    if calibrate:
        calib = [w[:, :-1] for w in windows(4, seed=5).split(2)]  # 2 batches: one per DP rank
        megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", groups.dp_group),
                           dp_group=groups.dp_group)
    else:
        megaquant.ptq.restore(model, recipe)
    if scales is not None:
        from megaquant.train.learnable import enable_learnable_scales

        enable_learnable_scales(model, scales)
    return model


def global_state(model, groups, what="param", optimizer=None):
    """Params (or AdamW ``exp_avg``) under global expert names; each rank returns its own."""
    from tests.moe.moe_helpers import global_name

    num_local = moe_config().num_moe_experts // groups.ep
    out = {}
    for name, p in model.named_parameters():
        t = p if what == "param" else optimizer.state[p][what]
        out[global_name(name, groups.ep_rank, num_local)] = t.detach().clone()
    return out


def full_optimizer_state(model, optimizer, tp_group):
    """exp_avg per param name, all-gathered to TP=1 shapes (SwiGLU fc1 rows re-interleaved)."""
    import torch.distributed as dist

    tp = dist.get_world_size(tp_group)
    out = {}
    for name, p in model.named_parameters():
        t = optimizer.state[p]["exp_avg"]
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        if tp > 1 and dim is not None:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            if "linear_fc1" in name:
                halves = [x.chunk(2, dim=0) for x in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
            t = torch.cat(parts, dim=dim)
        out[name] = t.clone()
    return out
