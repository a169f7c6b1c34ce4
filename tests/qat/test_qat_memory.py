"""The quantized local linears keep no fake-quantized copy of their weight for backward, and
their gradients are bit-identical to the path that keeps one (the reference)."""

import gc
import weakref

import pytest
import torch


def _model(recipe):
    import megaquant
    from megaquant.models.gpt import build_gpt_model, tiny_gpt_config
    from megaquant.spec import get_spec_provider

    torch.manual_seed(0)
    model = build_gpt_model(tiny_gpt_config(), get_spec_provider("local"), tp_size=1)
    calib = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))]
    megaquant.quantize(model, recipe, lambda m: [m(t, None, None) for t in calib])
    return model


def _track_fake_quantized_weights(model):
    """Weak references to every fake-quantized weight the forward creates."""
    refs = []
    for _, mod in model.named_modules():
        q = getattr(mod, "weight_quantizer", None)
        if q is not None:
            orig = q.forward

            def forward(x, orig=orig):
                y = orig(x)
                refs.append(weakref.ref(y))
                return y

            q.forward = forward
    return refs


def _forward_backward(model, keep_copy: bool):
    """Loss and grads; ``keep_copy`` turns the recompute hook off (the reference path)."""
    import contextlib
    from unittest import mock

    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    patch = (mock.patch("megaquant.nn.local._recompute_saved_weight",
                        lambda *a: contextlib.nullcontext())
             if keep_copy else contextlib.nullcontext())
    model.zero_grad(set_to_none=True)
    refs = _track_fake_quantized_weights(model)
    with patch:
        loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).sum()
        gc.collect()
        alive, made = sum(r() is not None for r in refs), len(refs)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), grads, alive, (made, len(refs) - made)


@pytest.mark.parametrize("recipe", ["nvfp4", "int4_w4a16"])
def test_no_fake_quantized_weight_saved_and_grads_identical(megatron_single, recipe):
    model = _model(recipe)
    loss, grads, alive, n = _forward_backward(model, keep_copy=False)
    ref_loss, ref_grads, ref_alive, ref_n = _forward_backward(model, keep_copy=True)
    assert ref_n == (8, 0)
    assert n == (8, 8), "8 weights (2 layers x qkv, proj, fc1, fc2), each recomputed once"
    assert ref_alive == 8, "control: without the hook every copy is kept for backward"
    assert alive == 0, f"{alive} fake-quantized weights kept alive for backward"
    assert loss == ref_loss
    for k in grads:
        assert torch.equal(grads[k], ref_grads[k]), k
