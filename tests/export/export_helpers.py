"""Shared pieces of the export tests: a quantized tiny GPT and the weights it computes with."""

from __future__ import annotations

import torch

SEQ = 16
# INT4's blocks of 128 need input dimensions that are multiples of 128 (the default tiny has 64)
ARCH = {"int4_w4a16": {"hidden_size": 128, "ffn_hidden_size": 256}}


def batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, SEQ + 1), generator=g) for _ in range(n)]


def quantized_tiny(recipe: str, dp_group, **arch_changes):
    """(calibrated tiny GPT at TP=1, its GPTConfig)."""
    import megaquant
    from megaquant.evaluate import run_forward
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config

    cfg = tiny_gpt_config(**{**ARCH.get(recipe, {}), **arch_changes})
    torch.manual_seed(0)
    model = build_gpt_model(cfg, tp_size=1)
    calib = [b[:, :-1] for b in batches(3, 1)]
    megaquant.quantize(model, recipe, lambda m: run_forward(m, calib, "calib", dp_group),
                       dp_group=dp_group)
    return model, cfg


@torch.no_grad()
def fake_quant_hf_state(model, cfg) -> dict:
    """HF-named weights the fake-quantized model really multiplies with (q(weight) per layer)."""
    from megaquant.models.mapping import megatron_to_hf
    from megaquant.nn.base import QuantModuleMixin

    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantModuleMixin) and layer.weight_quantizer.is_enabled:
            state[f"{name}.weight"] = layer.weight_quantizer(layer.weight).detach()
    return megatron_to_hf([state], cfg)


@torch.no_grad()
def round_params_to_bf16(model) -> None:
    """Make every parameter bfloat16-representable (still float32), so that a ``dtype=bfloat16``
    export of the unquantized tensors is lossless and the exported model can be compared exactly
    with the fake-quantized one. Quantizer state (amax) is untouched."""
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).float())
