"""Worker for the collective finite check: a TP=2 fp8 model where only rank 1's shard has a NaN."""


def nan_on_rank1() -> str:
    import torch

    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.finite import check_quantized_finite
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider

    init_distributed(timeout_s=60)
    groups = init_model_parallel(tp=2)
    torch.manual_seed(0)
    model = build_gpt_model(tiny_gpt_config(), get_spec_provider("local"))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]
    megaquant.quantize(model, "fp8", lambda m: run_forward(m, calib, "calib", groups.dp_group),
                       dp_group=groups.dp_group)
    if groups.tp_rank == 1:
        with torch.no_grad():
            model.get_submodule("decoder.layers.0.mlp.linear_fc2").weight[0, 0] = float("nan")
    try:
        check_quantized_finite(model, before="saving the checkpoint")
    except FloatingPointError as e:
        return str(e)
    return "passed"
