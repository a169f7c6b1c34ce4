"""Reading config.json of every family: both dialects, refusals by key name, bad tensors.

Reference values are the config's own numbers; every refusal must name the offending key (or
file/tensor) so a user can act on it.
"""

import json

import pytest
import torch

from megaquant.models.gpt import GPTConfig
from megaquant.models.hf import read_hf_model
from megaquant.models.hf_config import gpt_fields_from_hf
from tests.families.families import save_family

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
         "vocab_size": 256, "max_position_embeddings": 32}


def test_rope_parameters_theta_is_read():
    """Reliability case c20: transformers 5's rope_parameters with theta 5e5 (was read as 1e4)."""
    five = dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    four = dict(LLAMA, rope_theta=5e5, rope_scaling=None)
    assert gpt_fields_from_hf(five)["rotary_base"] == 5e5
    assert gpt_fields_from_hf(four)["rotary_base"] == 5e5
    assert gpt_fields_from_hf(five)["rope_scaling"] is None


def test_llama3_scaling_read_in_both_dialects():
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    five = dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **scaling})
    four = dict(LLAMA, rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling})
    old = dict(LLAMA, rope_theta=5e5, rope_scaling={"type": "llama3", **scaling})
    want = {"rope_type": "llama3", **scaling}
    assert [gpt_fields_from_hf(c)["rope_scaling"] for c in (five, four, old)] == [want] * 3


def test_qwen2_sliding_window_off_is_full_attention():
    cfg = dict(LLAMA, architectures=["Qwen2ForCausalLM"], sliding_window=4096,
               use_sliding_window=False)
    fields = gpt_fields_from_hf(cfg)
    assert fields["add_qkv_bias"] and fields["hf_family"] == "qwen2"


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["Qwen2VLForConditionalGeneration"]},
     "Qwen2VLForConditionalGeneration.*Qwen3Moe"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64, "use_sliding_window": True},
     "sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 3}}, "beta_fast"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     "disagrees"),
    ({"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"vision_config": {"hidden_size": 8}}, "vision_config"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 32,
      "mlp_only_layers": [0]}, "mlp_only_layers"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 32,
      "decoder_sparse_step": 2}, "decoder_sparse_step"),
])
def test_unsupported_features_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        gpt_fields_from_hf(dict(LLAMA, **change))


def test_seq_length_beyond_max_position_embeddings_refused():
    """Reliability case c17: seq_length 512 on a model trained to 32 positions."""
    fields = gpt_fields_from_hf(LLAMA)
    with pytest.raises(ValueError, match="seq_length=512.*max_position_embeddings=32"):
        GPTConfig.from_dict({**fields, "seq_length": 512})
    assert GPTConfig.from_dict({**fields, "seq_length": 32}).seq_length == 32


def _rewrite(directory, fn):
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


def test_bad_tensors_named_with_their_file(tmp_path):
    d = tmp_path / "m"
    save_family("qwen2", d)
    cfg, _ = read_hf_model(d)  # loads as saved
    assert cfg["add_qkv_bias"]
    _rewrite(d, lambda s: s.update({"model.layers.1.self_attn.k_proj.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\."
                                         r"k_proj\.bias has shape \(3,\).*\(32,\)"):
        read_hf_model(d)
    _rewrite(d, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError,
                       match=r"lacks 1 tensors.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        read_hf_model(d)


def test_extra_tensor_refused(tmp_path):
    """A bias the config does not declare (Llama without attention_bias) is not dropped silently."""
    d = tmp_path / "m"
    save_family("llama3", d)
    _rewrite(d, lambda s: s.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"o_proj\.bias.*model\.safetensors.*no place"):
        read_hf_model(d)


def test_missing_shard_named(tmp_path):
    d = tmp_path / "m"
    save_family("qwen3", d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        read_hf_model(d)


def test_parallel_sizes_the_model_does_not_divide():
    fields = gpt_fields_from_hf(dict(LLAMA, architectures=["MixtralForCausalLM"],
                                     num_local_experts=4))
    arch = GPTConfig.from_dict({**fields, "seq_length": 16})
    with pytest.raises(ValueError, match="tensor parallel must be 1 or 2, got 4"):
        arch.check_tensor_parallel(4)
    with pytest.raises(ValueError, match=r"expert parallel must be one of \[1, 2, 4\], got 3"):
        arch.check_expert_parallel(3)


def test_reading_and_exporting_families_does_not_import_transformers(tmp_path):
    """The package reads config.json itself; transformers is a test-only (dev) dependency."""
    import subprocess
    import sys

    save_family("qwen3_moe", tmp_path / "m")
    code = ("import sys; sys.modules['transformers'] = None\n"  # any import of it now fails
            "from megaquant.models.hf import read_hf_model\n"
            "from megaquant.models.gpt import GPTConfig\n"
            "from megaquant.export.families import hf_config\n"
            f"cfg, _ = read_hf_model({str(tmp_path / 'm')!r})\n"
            "arch = GPTConfig.from_dict({**cfg, 'seq_length': 16})\n"
            "print(hf_config(arch, torch_dtype='float32')['architectures'][0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "Qwen3MoeForCausalLM", r.stderr[-2000:]
