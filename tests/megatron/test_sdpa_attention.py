"""SDPAttention against an explicit float64 softmax(QK^T / sqrt(d)) attention."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megaquant.megatron.portable import SDPAttention
from megaquant.models.gpt import tiny_gpt_config

TOL = 1e-5  # float32 SDPA vs float64 reference, |scores| ~ O(1): rounding only


def reference_attention(q, k, v, causal: bool, masked_out=None):
    """[s, b, h, d] inputs, K/V with fewer heads (GQA). Float64, explicit softmax."""
    q, k, v = (t.double() for t in (q, k, v))
    sq, b, nq, d = q.shape
    skv, nkv = k.shape[0], k.shape[2]
    out = torch.empty(sq, b, nq, d, dtype=torch.float64)
    for head in range(nq):
        group = head // (nq // nkv)  # query heads of one KV group are contiguous
        scores = torch.einsum("sbd,tbd->bst", q[:, :, head], k[:, :, group]) / math.sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(sq, skv).triu(1).bool(), float("-inf"))
        if masked_out is not None:
            scores = scores.masked_fill(masked_out[:, 0], float("-inf"))
        out[:, :, head] = torch.einsum("bst,tbd->sbd", scores.softmax(-1), v[:, :, group])
    return out.reshape(sq, b, nq * d)


def _attention(mask_type):
    config = tiny_gpt_config().to_transformer_config(1)
    return SDPAttention(config, layer_number=1, attn_mask_type=mask_type,
                        attention_type="self").eval()


@pytest.mark.parametrize("nkv", [4, 2, 1])
def test_sdpa_attention_matches_float64_causal_gqa(nkv):
    torch.manual_seed(0)
    q = torch.randn(12, 3, 4, 16)
    k, v = torch.randn(12, 3, nkv, 16), torch.randn(12, 3, nkv, 16)
    got = _attention(AttnMaskType.causal)(q, k, v, attention_mask=None)
    assert got.shape == (12, 3, 64)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, causal=True),
                               atol=TOL, rtol=0)


def test_sdpa_attention_padding_mask_uses_megatron_convention():
    torch.manual_seed(1)
    q, k, v = torch.randn(8, 2, 4, 16), torch.randn(8, 2, 2, 16), torch.randn(8, 2, 2, 16)
    masked_out = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masked_out[1, :, :, 5:] = True  # sample 1: last three keys are padding
    got = _attention(AttnMaskType.padding)(q, k, v, attention_mask=masked_out)
    want = reference_attention(q, k, v, causal=False, masked_out=masked_out)
    torch.testing.assert_close(got.double(), want, atol=TOL, rtol=0)


def test_sdpa_attention_rejects_packed_sequences():
    q = torch.randn(4, 1, 4, 16)
    with pytest.raises(ValueError, match="packed"):
        _attention(AttnMaskType.causal)(q, q, q, None, packed_seq_params=object())
