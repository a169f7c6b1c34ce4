"""Bridge's PTQ flow (``quantize_and_save``) and the ``export_hf_weights_quant`` arguments.

PTQ: built through the provider double, saved (megaquant's checkpoint writer stands for Bridge's
``save_megatron_model``, both save ``sharded_state_dict``), restored into a hooked model the way
a QAT run does; reference: ``megaquant.quantize`` on the same weights.
Export: Bridge's column/row mappings call ``quant_fn`` on each weight and write
``code x scale_inv``; that product must equal the layer's own fake-quantized weight exactly.
"""

import pytest
import torch

from tests.integrations.bridge_doubles import ProviderDouble
from tests.integrations.test_bridge_hook import (
    _amax,
    _assert_same_amax,
    _build,
    _loop,
    _reference,
    _weights_hook,
    weights,  # noqa: F401  (fixture)
)


def _save(model, path):
    from megaquant.integrations.nemo import unwrap
    from megaquant.megatron.checkpoint import save_checkpoint

    save_checkpoint(unwrap(model[0]), path, metadata={})


def test_quantize_and_save_then_qat_restore(weights, tmp_path):  # noqa: F811
    from megaquant.integrations.bridge import attach
    from megaquant.integrations.bridge_ptq import quantize_and_save
    from megaquant.integrations.nemo import unwrap
    from megaquant.megatron.checkpoint import load_checkpoint, read_metadata

    provider = ProviderDouble(_build)
    provider.register_pre_wrap_hook(_weights_hook(weights))  # AutoBridge's HF weights
    model = quantize_and_save(provider, "fp8", _loop, tmp_path / "ptq", save=_save)
    _assert_same_amax(_amax(model[0]), _amax(_reference(weights, "fp8")))
    record = read_metadata(tmp_path / "ptq")
    assert record["writer"] == "megatron-bridge" and record["metadata"]["kind"] == "ptq"
    qat = ProviderDouble(_build)  # the QAT job: attach with init_from, Bridge loads the file
    attach(qat, "fp8", init_from=tmp_path / "ptq")
    trained = qat.provide_distributed_model(ddp_config=object())
    load_checkpoint(unwrap(trained[0]), tmp_path / "ptq")  # Bridge's pretrained_checkpoint load
    _assert_same_amax(_amax(trained[0]), _amax(model[0]))
    with pytest.raises(ValueError, match=r"'fp8' \(.*\), but this run uses 'nvfp4'"):
        attach(ProviderDouble(_build), "nvfp4", init_from=tmp_path / "ptq")(_build())


def _bridge_mapping(args, layer, parallel):
    """What Bridge's Column/RowParallelMapping.megatron_to_hf_quant do at TP=1."""
    w = layer.weight
    assert args.quantization_checker("decoder.layers.0.mlp.linear_fc1.weight")
    q, scale_inv = args.quant_fn(w, args.quant_block_size)
    assert q.dim() == 2 and scale_inv.dim() == 2 and scale_inv.dtype == torch.float32
    rows, cols = q.shape
    block = cols // scale_inv.shape[1]
    return (q.float().reshape(rows, -1, block) * scale_inv.unsqueeze(-1)).reshape(rows, cols)


@pytest.mark.parametrize("recipe", ["fp8", "fp8_per_channel", "mxfp8"])
def test_export_args_reproduce_the_fake_quantized_weight(weights, recipe):  # noqa: F811
    from megaquant.integrations.bridge_export import quant_export_args

    model = _reference(weights, recipe)
    args = quant_export_args([model])
    assert args.quant_block_size == ((1, 32) if recipe == "mxfp8" else (1, 1))
    assert not args.quantization_checker("decoder.layers.0.mlp.router.weight")
    assert not args.quantization_checker("output_layer.weight")  # excluded by the recipe
    for layer in (model.decoder.layers[0].mlp.linear_fc1, model.decoder.layers[1].
                  self_attention.linear_proj):
        want = layer.weight_quantizer(layer.weight.detach())
        assert torch.equal(_bridge_mapping(args, layer, None), want)
    with pytest.raises(KeyError, match="not a quantized layer's own parameter"):
        args.quant_fn(layer.weight.detach().clone(), None)


def test_export_refuses_formats_bridge_cannot_carry(weights):  # noqa: F811
    from megaquant.integrations.bridge_export import export_hf_weights_quant, quant_export_args

    with pytest.raises(ValueError, match=r"layers\.0\.self_attention\.linear_proj\."
                                         r"weight_quantizer: NVFP4.* cannot be carried.*"
                                         r"scripts/export.py"):
        quant_export_args([_reference(weights, "nvfp4")])
    with pytest.raises(AttributeError, match=r"has no export_hf_weights_quant \(Megatron-Bridge "
                                             r">= 0\.5"):
        export_hf_weights_quant(object(), [_reference(weights, "fp8")])
