"""Worker for test_random_moe_layouts: the tiny_moe random model as scripts/ptq.py builds it."""

import re

_LOCAL = re.compile(r"(local_experts\.)(\d+)(\.)")


def build_global_state(ep: int) -> dict:
    """{name with global expert index: tensor} of this rank's tiny_moe model at EP=``ep``."""
    import torch
    from omegaconf import OmegaConf

    from megaquant.jobs.common import load_model_source
    from megaquant.jobs.ptq import build_model
    from megaquant.megatron.dist import init_distributed, init_model_parallel
    from tests.distributed_utils import ROOT

    init_distributed(timeout_s=120)
    groups = init_model_parallel(tp=1, pp=1, ep=ep, seed=1234)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/tiny_moe.yaml"))
    model = build_model(load_model_source(cfg), groups, "spec", seed=1234)
    num_local = 4 // ep
    out = {}
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
            name = _LOCAL.sub(
                lambda m: f"{m.group(1)}{groups.ep_rank * num_local + int(m.group(2))}"
                          f"{m.group(3)}", name)
            out[name] = value.detach().clone()
    return out
