"""An independent reader of exported checkpoints, written from the published format definitions.

Shares no code with ``megaquant.export`` or ``megaquant.formats``: bits are decoded by hand.

* E2M1 (OCP MX v1.0, NVFP4 elements): code = sign(bit 3) | exponent(bits 2-1) | mantissa(bit 0),
  bias 1; exponent 0 is subnormal (0 or 0.5). Two codes per byte, element 2j in the low nibble.
* E4M3 "fn" (OCP FP8): sign(bit 7) | exponent(bits 6-3, bias 7) | mantissa(bits 2-0);
  exponent 0 is subnormal (m/8 * 2^-6); S.1111.111 is NaN; no infinities.
* ModelOpt NVFP4: value = (e2m1 * weight_scale) * weight_scale_2; FP8: value = e4m3 * weight_scale.
* compressed-tensors NVFP4: value = e2m1 * (weight_scale / weight_global_scale); we compute it as
  (e2m1 * weight_scale) / weight_global_scale (see the tolerance note in the tests);
  float-quantized: e4m3 * weight_scale; pack-quantized INT4: eight 4-bit fields per int32, lowest
  bits first, each ``code + 8``; value = code * weight_scale (per group of ``group_size``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_tensors(directory: Path) -> dict:
    """All tensors of a directory: model.safetensors, or the shards its index lists."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    out = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


def decode_e2m1(nibbles: torch.Tensor) -> torch.Tensor:
    n = nibbles.to(torch.int64)
    sign = torch.where((n >> 3) & 1 == 1, -1.0, 1.0)
    e, m = (n >> 1) & 3, n & 1
    mag = torch.where(e == 0, m * 0.5, (1 + m * 0.5) * torch.pow(2.0, (e - 1).double()))
    return (sign * mag).float()


def decode_e4m3(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.uint8).to(torch.int64)
    sign = torch.where((b >> 7) & 1 == 1, -1.0, 1.0).double()
    e, m = (b >> 3) & 15, b & 7
    normal = (1 + m / 8.0) * torch.pow(2.0, (e - 7).double())
    sub = (m / 8.0) * 2.0**-6
    val = sign * torch.where(e == 0, sub, normal)
    val = torch.where((e == 15) & (m == 7), torch.full_like(val, float("nan")), val)
    return val.float()  # every E4M3 value is exact in float32


def unpack_low_nibble_first(packed: torch.Tensor, k: int) -> torch.Tensor:
    p = packed.to(torch.int64)
    out = torch.empty(*p.shape[:-1], p.shape[-1] * 2, dtype=torch.int64)
    out[..., 0::2] = p % 16
    out[..., 1::2] = p // 16
    return out[..., :k]


def unpack_int32_fields(packed: torch.Tensor, k: int) -> torch.Tensor:
    words = packed.to(torch.int64) % 2**32  # two's complement int32 -> unsigned
    fields = [(words // 16**i) % 16 for i in range(8)]
    return torch.stack(fields, dim=-1).reshape(*packed.shape[:-1], -1)[..., :k] - 8


def _per_block(scale: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, n_blocks] scales repeated over the block elements, cut to k columns."""
    block = -(-k // scale.shape[-1])  # ceil(k / n_blocks)
    return scale.repeat_interleave(block, dim=-1)[..., :k]


def modelopt_weight(sd: dict, module: str, algo: str, shape) -> torch.Tensor:
    w = sd[f"{module}.weight"]
    if algo == "NVFP4":
        vals = decode_e2m1(unpack_low_nibble_first(w, shape[-1]))
        s = _per_block(decode_e4m3(sd[f"{module}.weight_scale"]), shape[-1])
        return (vals * s) * sd[f"{module}.weight_scale_2"].float()
    assert algo == "FP8", algo
    return decode_e4m3(w) * sd[f"{module}.weight_scale"].float()


def ct_weight(sd: dict, module: str, group: dict, shape) -> torch.Tensor:
    """Dequantize one compressed-tensors module from its config group's ``weights`` args."""
    args = group["weights"]
    if args["type"] == "float" and args["num_bits"] == 4:
        vals = decode_e2m1(unpack_low_nibble_first(sd[f"{module}.weight_packed"], shape[-1]))
        s = _per_block(decode_e4m3(sd[f"{module}.weight_scale"]), shape[-1])
        return (vals * s) / sd[f"{module}.weight_global_scale"].float()
    if args["type"] == "float" and args["num_bits"] == 8:
        return decode_e4m3(sd[f"{module}.weight"]) * sd[f"{module}.weight_scale"].float()
    assert args["type"] == "int" and args["num_bits"] == 4, args
    stored = sd[f"{module}.weight_shape"].tolist()
    assert stored == list(shape), (stored, shape)
    codes = unpack_int32_fields(sd[f"{module}.weight_packed"], shape[-1]).float()
    return codes * _per_block(sd[f"{module}.weight_scale"].float(), shape[-1])
