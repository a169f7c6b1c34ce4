"""An independent reader of exported checkpoints, written from the published format definitions.

Shares no code with ``megaquant.export`` or ``megaquant.formats``: bits are decoded by hand.

* E2M1 (OCP MX v1.0, NVFP4 elements): code = sign(bit 3) | exponent(bits 2-1) | mantissa(bit 0),
  bias 1; exponent 0 is subnormal (0 or 0.5). Two codes per byte, element 2j in the low nibble.
* E4M3 "fn" (OCP FP8): sign(bit 7) | exponent(bits 6-3, bias 7) | mantissa(bits 2-0);
  exponent 0 is subnormal (m/8 * 2^-6); S.1111.111 is NaN; no infinities.
* E8M0 (OCP MX block scale): unsigned biased exponent, value 2^(s - 127), 255 is NaN.
* ModelOpt NVFP4 / W4A16_NVFP4: value = (e2m1 * weight_scale) * weight_scale_2; FP8: value =
  e4m3 * weight_scale; W8A8_SQ_PER_CHANNEL: int8 * weight_scale[row]; MXFP8 / mxfp4: element *
  2^(weight_scale - 127) per block of 32; W4A16_AWQ: rows 2j / 2j+1 in the low / high nibble of
  uint8 [out/2, in], two's-complement nibbles, value = code * weight_scale (per group).
* compressed-tensors NVFP4: value = e2m1 * (weight_scale / weight_global_scale); we compute it as
  (e2m1 * weight_scale) / weight_global_scale (see the tolerance note in the tests);
  float-quantized: e4m3 * weight_scale; int-quantized: int8 * weight_scale; mxfp8-quantized /
  mxfp4-pack-quantized: element * 2^(weight_scale - 127); pack-quantized INT4: eight 4-bit
  fields per int32, lowest bits first, each ``code + 8``; value = code * weight_scale (per group
  of ``group_size``).
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


def decode_e8m0(s: torch.Tensor) -> torch.Tensor:
    e = s.to(torch.int64)
    val = torch.pow(torch.tensor(2.0, dtype=torch.float64), (e - 127).double())
    return torch.where(e == 255, torch.full_like(val, float("nan")), val).float()  # 2^-127 is exact


def unpack_rows_twos_complement(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in] -> codes [out, in]: row 2j from the low nibble, 2j+1 from the high."""
    p = packed.to(torch.int64)
    lo, hi = p % 16, p // 16
    out = torch.empty(p.shape[0] * 2, p.shape[1], dtype=torch.int64)
    out[0::2], out[1::2] = lo, hi
    return torch.where(out >= 8, out - 16, out)


def modelopt_weight(sd: dict, module: str, algo: str, shape) -> torch.Tensor:
    w = sd[f"{module}.weight"]
    scale = sd[f"{module}.weight_scale"]
    if algo in ("NVFP4", "W4A16_NVFP4"):
        vals = decode_e2m1(unpack_low_nibble_first(w, shape[-1]))
        s = _per_block(decode_e4m3(scale), shape[-1])
        return (vals * s) * sd[f"{module}.weight_scale_2"].float()
    if algo == "MXFP8":
        return decode_e4m3(w) * _per_block(decode_e8m0(scale), shape[-1])
    if algo == "mxfp4":
        return (decode_e2m1(unpack_low_nibble_first(w, shape[-1]))
                * _per_block(decode_e8m0(scale), shape[-1]))
    if algo == "W8A8_SQ_PER_CHANNEL":
        return w.to(torch.int64).float() * scale.float().reshape(-1, 1)
    if algo == "W4A16_AWQ":
        codes = unpack_rows_twos_complement(w).float()
        return codes * _per_block(scale.float(), shape[-1])
    assert algo == "FP8", algo
    return decode_e4m3(w) * scale.float()


def ct_weight(sd: dict, module: str, group: dict, shape) -> torch.Tensor:
    """Dequantize one compressed-tensors module from its config group's ``weights`` args."""
    args = group["weights"]
    if args.get("scale_dtype") == "torch.uint8":  # MX: E8M0 block scales
        assert args["group_size"] == 32, args
        s = _per_block(decode_e8m0(sd[f"{module}.weight_scale"]), shape[-1])
        if args["num_bits"] == 4:
            return decode_e2m1(unpack_low_nibble_first(sd[f"{module}.weight_packed"],
                                                       shape[-1])) * s
        return decode_e4m3(sd[f"{module}.weight"]) * s
    if args["type"] == "int" and args["num_bits"] == 8:
        return sd[f"{module}.weight"].to(torch.int64).float() * sd[f"{module}.weight_scale"].float()
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
