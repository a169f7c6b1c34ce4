"""megaquant.models.rope against transformers' own RoPE initialisers (the reference).

float32 both sides; the frequencies must agree to 1 ulp-ish (rtol 1e-6), and the attention
factor transformers returns must be 1 for every scaling we accept (we do not scale logits).
"""

import pytest
import torch

from megaquant.models.rope import RopeScaling, rope_inv_freq

transformers = pytest.importorskip("transformers")

CASES = {
    "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "llama3_other": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0,
                     "high_freq_factor": 8.0, "original_max_position_embeddings": 4096},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_inv_freq_equals_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = CASES[case]
    cfg = transformers.AutoConfig.for_model("llama", hidden_size=1024, num_attention_heads=8,
                                            max_position_embeddings=131072,
                                            rope_parameters={"rope_theta": 5e5, **params})
    ref, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    ours = rope_inv_freq(128, 5e5, RopeScaling.from_dict(params))
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    plain = rope_inv_freq(128, 5e5)
    assert case == "dynamic" or not torch.allclose(ours, plain)  # the scaling did something


def test_rope_scaling_rejects_unknown_keys_and_types():
    with pytest.raises(ValueError, match="unknown rope_scaling keys.*beta_fast"):
        RopeScaling.from_dict({"rope_type": "linear", "factor": 2.0, "beta_fast": 32})
    with pytest.raises(ValueError, match="'yarn' is not implemented"):
        RopeScaling.from_dict({"rope_type": "yarn", "factor": 2.0})
