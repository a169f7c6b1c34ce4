"""Bit packing of sub-byte codes, as the serving formats store them (pure torch, no I/O).

* **E2M1 nibbles in uint8** (NVFP4 in ModelOpt's and compressed-tensors' layouts): two 4-bit
  codes per byte along the last (input) dimension, the *even* element in the low nibble:
  ``byte[..., j] = code[..., 2j] | code[..., 2j + 1] << 4``. A code is ``sign << 3 | index`` into
  the E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, which is what megaquant's NVFP4 ``quantize``
  returns, so no re-encoding is needed.
* **INT4 in int32** (compressed-tensors ``pack-quantized``): signed codes in [-8, 7] are offset by
  +8 to unsigned nibbles and packed eight per int32 word along the last dimension, element
  ``8j + i`` in bits ``4i .. 4i + 3`` (the first element in the lowest bits).

Odd or ragged last dimensions are zero-padded to a whole byte/word; the writer records the
unpacked shape (``weight_shape``), so readers drop the padding again.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_PER_INT32 = 8
INT4_OFFSET = 8  # signed [-8, 7] -> unsigned [0, 15]


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def pack_nibbles_uint8(codes: Tensor) -> Tensor:
    """uint8 4-bit codes [..., K] -> uint8 [..., ceil(K/2)], low nibble first."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_nibbles_uint8 takes uint8 4-bit codes, got {codes.dtype}")
    assert codes.numel() == 0 or int(codes.max()) <= 15, "codes must fit in 4 bits"
    c = _pad_last(codes, 2)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_nibbles_uint8(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_nibbles_uint8`: uint8 [..., ceil(k/2)] -> uint8 codes [..., k]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1)[..., :k].contiguous()


def pack_int4_int32(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] [..., K] -> int32 [..., ceil(K/8)], first element in the low bits."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4_int32 takes int8 codes in [-8, 7], got {codes.dtype}")
    u = _pad_last(codes.to(torch.int64), INT4_PER_INT32) + INT4_OFFSET  # padding = code 0
    u = u.reshape(*u.shape[:-1], -1, INT4_PER_INT32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (u << shifts).sum(dim=-1)  # disjoint bit fields: the sum is an OR
    # the top nibble may set bit 31: wrap into int32's range as two's complement
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_int32(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_int4_int32`: int32 [..., ceil(k/8)] -> int8 codes [..., k]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    u = (words.unsqueeze(-1) >> shifts) & 0xF
    return (u.reshape(*packed.shape[:-1], -1)[..., :k] - INT4_OFFSET).to(torch.int8)


def pack_int4_rows_uint8(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] [out, in] -> uint8 [out/2, in], packed along the *output* dimension.

    ModelOpt's INT4 (``W4A16_AWQ``) layout: rows 2j and 2j + 1 share a byte, row 2j in the low
    nibble, each code as a two's-complement nibble (``code & 0xF``, no offset).
    """
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"pack_int4_rows_uint8 takes 2-D int8 codes, "
                        f"got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[0] % 2:
        raise ValueError(f"INT4 packing along the output dimension needs an even number of rows, "
                         f"got {codes.shape[0]}")
    nib = (codes.to(torch.int16) & 0x0F).to(torch.uint8)
    return (nib[0::2] | (nib[1::2] << 4)).contiguous()


def unpack_int4_rows_uint8(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4_rows_uint8`: uint8 [out/2, in] -> int8 codes [out, in]."""
    lo, hi = (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[-1])
    return torch.where(both >= 8, both - 16, both).to(torch.int8)
