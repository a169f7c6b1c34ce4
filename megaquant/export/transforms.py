"""Online transforms in exports: written where a layout can say them, refused where it cannot.

A model calibrated with ``block_hadamard`` multiplies some linears' inputs by a block-diagonal
Hadamard ``T = I (x) H_b / sqrt(b)`` at run time; the weights already hold ``W T`` (folded at
calibration). An engine must therefore apply ``x -> x T`` before quantizing the input:

* **compressed-tensors**: ``quantization_config.transform_config`` (what llm-compressor's
  Hadamard modifiers write and vLLM applies) gets one group per block size: type ``hadamard``
  (Sylvester, normalised by ``sqrt(b)``: the same matrix), ``head_dim: b`` (block-diagonal),
  applied at location ``input`` of the listed modules. No ``weight_input`` entry is written: the
  stored weights already hold the rotation, and a loader that fused it again would rotate twice.
* **ModelOpt / TensorRT-LLM** has no field for an input transform: such a model is refused there
  with the layers and the transform named (skipped under ``layouts: auto``, an error when asked
  for explicitly), never written without it.

The residual rotation needs nothing here: it lives entirely in the weights.
"""

from __future__ import annotations

from megaquant.calib.block_hadamard import transformed_layers
from megaquant.export.names import hf_targets

NO_TRANSFORMS = ("modelopt",)  # layouts that cannot express an online input transform


def online_transforms(model, arch=None) -> dict[str, int]:
    """HF module name -> Hadamard block of every exported linear with an online input transform
    (``arch``: the family's names, :func:`megaquant.export.names.hf_targets`)."""
    out = {}
    for name, block in transformed_layers(model).items():
        for hf in hf_targets(name, arch)[0]:
            out[hf] = block
    return out


def refuse_layouts(transforms: dict, chosen: list, skipped: dict, explicit: bool):
    """Drop the layouts that cannot carry ``transforms`` (ValueError if one was asked for)."""
    if not transforms:
        return chosen, skipped
    names = sorted(transforms)
    why = (f"the model applies an online block Hadamard (block {sorted(set(transforms.values()))}) "
           f"to the inputs of {names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)} "
           "modules), which this layout cannot express; export the compressed-tensors layout "
           "(transform_config) or quantize without calib block_hadamard")
    bad = [lay for lay in chosen if lay in NO_TRANSFORMS]
    if bad and (explicit or len(bad) == len(chosen)):
        raise ValueError(f"layout {bad[0]!r} refused: {why}")
    return ([lay for lay in chosen if lay not in NO_TRANSFORMS],
            {**skipped, **{lay: f"{lay}: {why}" for lay in bad}})


def transform_config(transforms: dict) -> dict:
    """compressed-tensors ``transform_config`` for ``transforms`` (one group per block size)."""
    groups = {}
    for block in sorted(set(transforms.values())):
        targets = sorted(n for n, b in transforms.items() if b == block)
        groups[f"block_hadamard_{block}"] = {
            "type": "hadamard", "randomize": False, "requires_grad": False, "head_dim": block,
            "precision": "float32",
            "apply": [{"targets": targets, "location": "input", "inverse": False, "ignore": []}]}
    return {"config_groups": groups}
