"""Megatron GPTModel (built by megaquant, weights through hf_to_megatron) == the reference LLaMA.

This closes the loop between the loaders, the HF->Megatron mapping, the portable CPU attention
and the model builder: an independent float64 LLaMA forward (tests/models/reference_llama.py)
on the same HF-named weights must give the same logits. Tolerance: float32 forward of a
2-layer model with logits of O(1): 1e-4 absolute.
"""

import pytest
import torch

from tests.models.random_llama import random_hf_state
from tests.models.reference_llama import llama_forward


@pytest.mark.parametrize("tie", [True, False])
def test_megatron_logits_equal_reference_llama(megatron_single, tie):
    from megaquant.models.gpt import GPTConfig, build_gpt_model
    from megaquant.models.mapping import hf_to_megatron

    arch = dict(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6,
                num_query_groups=3, vocab_size=64, seq_length=16, rotary_base=100000.0,
                norm_epsilon=1e-5, tie_embeddings=tie)
    cfg = GPTConfig.from_dict(arch)
    # Scale random weights so activations stay O(1) and the comparison is meaningful.
    hf = {k: (v * 0.2 if v.dim() == 2 else 1 + 0.1 * v)
          for k, v in random_hf_state(arch, seed=1).items()}
    model = build_gpt_model(cfg, tp_size=1)
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf, cfg, 0, 1), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None].expand(2, 16)
    with torch.no_grad():
        out = model.eval()(tokens, pos, None)
    ref = llama_forward(hf, arch, tokens, dtype=torch.float64)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)
