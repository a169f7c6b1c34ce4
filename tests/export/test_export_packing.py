"""Bit packing against slow per-element loops written from the layout definitions."""

import pytest
import torch

from megaquant.export.packing import (
    pack_int4_int32,
    pack_int4_rows_uint8,
    pack_nibbles_uint8,
    unpack_int4_int32,
    unpack_int4_rows_uint8,
    unpack_nibbles_uint8,
)


def test_pack_nibbles_low_nibble_first_matches_loop():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 7), generator=g, dtype=torch.uint8)  # odd K: padded
    packed = pack_nibbles_uint8(codes)
    assert packed.shape == (3, 4) and packed.dtype == torch.uint8
    for r in range(3):
        for j in range(4):
            lo = int(codes[r, 2 * j])
            hi = int(codes[r, 2 * j + 1]) if 2 * j + 1 < 7 else 0
            assert int(packed[r, j]) == lo + 16 * hi
    assert torch.equal(unpack_nibbles_uint8(packed, 7), codes)


def test_pack_int4_int32_first_element_in_low_bits_matches_loop():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (2, 19), generator=g, dtype=torch.int8)  # ragged: 3 words
    packed = pack_int4_int32(codes)
    assert packed.shape == (2, 3) and packed.dtype == torch.int32
    for r in range(2):
        for w in range(3):
            word = 0
            for i in range(8):
                k = 8 * w + i
                word |= ((int(codes[r, k]) + 8) if k < 19 else 8) << (4 * i)
            assert int(packed[r, w]) & 0xFFFFFFFF == word
    assert torch.equal(unpack_int4_int32(packed, 19), codes)


def test_pack_int4_rows_pairs_output_rows_twos_complement_matches_loop():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-8, 8, (6, 5), generator=g, dtype=torch.int8)
    packed = pack_int4_rows_uint8(codes)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    for j in range(3):
        for c in range(5):
            lo, hi = int(codes[2 * j, c]) % 16, int(codes[2 * j + 1, c]) % 16  # two's complement
            assert int(packed[j, c]) == lo + 16 * hi
    assert torch.equal(unpack_int4_rows_uint8(packed), codes)
    with pytest.raises(ValueError, match="even number of rows"):
        pack_int4_rows_uint8(codes[:5])
