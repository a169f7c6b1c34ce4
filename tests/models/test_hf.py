"""megaquant.models.hf: local Hugging Face LLaMA directories (single file and sharded)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megaquant.models.hf import read_hf_llama
from tests.models.random_llama import random_hf_state

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 24,
             "intermediate_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3,
             "num_hidden_layers": 2, "vocab_size": 30, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
             "max_position_embeddings": 128, "tie_word_embeddings": False, "hidden_act": "silu"}
ARCH = {"num_layers": 2, "hidden_size": 24, "ffn_hidden_size": 48, "num_attention_heads": 6,
        "num_query_groups": 3, "vocab_size": 30, "tie_embeddings": False}


def write_dir(path, config, state, shards=1):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i::shards]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_read_hf_llama_round_trip(tmp_path, shards):
    state = random_hf_state(ARCH)
    write_dir(tmp_path / "m", HF_CONFIG, state, shards)
    cfg, loaded = read_hf_llama(tmp_path / "m")
    assert cfg == {"num_layers": 2, "hidden_size": 24, "ffn_hidden_size": 48,
                   "num_attention_heads": 6,
                   "num_query_groups": 3, "vocab_size": 30, "seq_length": 128,
                   "rotary_base": 100000.0,
                   "norm_epsilon": 1e-5, "normalization": "RMSNorm", "gated_linear_unit": True,
                   "add_bias_linear": False, "tie_embeddings": False,
                   "max_position_embeddings": 128,
                   "rope_scaling": None, "add_qkv_bias": False, "qk_layernorm": False,
                   "hf_family": "llama"}
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_read_hf_llama_tied_drops_lm_head(tmp_path):
    state = random_hf_state(ARCH)
    write_dir(tmp_path / "m", dict(HF_CONFIG, tie_word_embeddings=True), state)
    cfg, loaded = read_hf_llama(tmp_path / "m")
    assert cfg["tie_embeddings"] and "lm_head.weight" not in loaded


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GemmaForCausalLM"]}, "GemmaForCausalLM.*not supported"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
])
def test_read_hf_llama_rejects_unsupported(tmp_path, change, match):
    write_dir(tmp_path / "m", dict(HF_CONFIG, **change), random_hf_state(ARCH))
    with pytest.raises(ValueError, match=match):
        read_hf_llama(tmp_path / "m")


def test_read_hf_llama_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        read_hf_llama(tmp_path)
