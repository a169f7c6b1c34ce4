"""Core attention on ``F.scaled_dot_product_attention``: the CPU runtime's ``core_attention()``.

Replaces Megatron's ``DotProductAttention``, which takes its score buffer from
``GlobalMemoryBuffer`` on ``torch.cuda.current_device()``, builds its causal mask with
``get_default_causal_mask(device="cuda")`` and forks the CUDA RNG tracker for dropout. Chosen
through the spec (:class:`megaquant.megatron.cpu.spec.CPUSpecProvider`), not by patching.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Core attention on ``F.scaled_dot_product_attention``; replaces ``DotProductAttention``.

    Same constructor keywords as Megatron's ``DotProductAttention`` so a spec can name either.
    ``forward`` takes q/k/v as ``[s, b, heads, head_dim]`` (heads of this TP rank; K/V may have
    fewer heads, the GQA query groups) and returns ``[s, b, heads * head_dim]``.

    Masks follow Megatron's convention: ``attention_mask`` is boolean with True = *masked out*
    (SDPA's boolean mask means the opposite, so we invert it). A causal mask type adds the
    causal mask; when there are more keys than queries (decoding with a KV cache) it is aligned
    to the bottom-right, so the last query sees every key.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused_kwargs,
    ):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("SDPAttention does not implement context parallelism; set "
                             "parallel.cp=1 or run on GPU with TE attention")
        self.layer_number = max(1, layer_number)
        # The TP group this layer's heads are split over (the K/V quantizers' amax is reduced
        # over it); Megatron's Attention always passes its pg_collection.
        self.tp_group = getattr(pg_collection, "tp", None)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        # Megatron's query-key layer scaling divides the scores by layer_number and multiplies
        # them back inside the softmax: a no-op in exact arithmetic, so we ignore it.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not support packed sequences (THD); "
                             "use unpacked [s, b] batches")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, nq, d = query.shape
        nkv = key.shape[2]
        if nq % nkv != 0:
            raise ValueError(f"query heads {nq} are not a multiple of key/value heads {nkv}")
        # GQA: query heads of one group are contiguous in Megatron's QKV layout.
        key = key.repeat_interleave(nq // nkv, dim=2)
        value = value.repeat_interleave(nq // nkv, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        mask = self._sdpa_mask(attention_mask, mask_type, sq, k.shape[2], q.device)
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        dropout_p = self.dropout_p if self.training else 0.0
        # Dropout inside a TP region draws from the model-parallel RNG (different per TP rank).
        rng = mcore_random.get_cuda_rng_tracker().fork if dropout_p > 0 else contextlib.nullcontext
        with rng():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * d)

    @staticmethod
    def _sdpa_mask(attention_mask, mask_type, sq: int, skv: int, device) -> Optional[torch.Tensor]:
        """Combine the causal mask and Megatron's mask into SDPA's "True = attend" form."""
        keep = None
        if mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
            keep = torch.ones(sq, skv, dtype=torch.bool, device=device).tril(skv - sq)
        if attention_mask is not None:
            passed = ~attention_mask.to(torch.bool)
            keep = passed if keep is None else keep & passed
        return keep
