"""megaquant.models.mapping: HF <-> Megatron-Core (local spec) state dicts with TP sharding.

References: exact round trip (bitwise), a hand-written QKV/fc1 layout, and the key names and shapes
of a real megatron-core GPTModel built in a subprocess.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from megaquant.models.mapping import hf_to_megatron, megatron_to_hf
from megaquant.models.smollm2 import SMOLLM2_135M
from tests.models.random_llama import random_hf_state

SMALL = {"num_layers": 2, "hidden_size": 24, "ffn_hidden_size": 48, "num_attention_heads": 6,
         "num_query_groups": 3, "vocab_size": 30, "tie_embeddings": False}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# SmolLM2's real per-layer shapes; 2 of its 30 layers (every layer has the same shapes) to keep
# memory and time small.
SMOLLM2_2L = dict(SMOLLM2_135M, num_layers=2)


@pytest.mark.parametrize("cfg", [SMALL, dict(SMALL, tie_embeddings=True), SMOLLM2_2L],
                         ids=["small-untied", "small-tied", "smollm2-2layers"])
@pytest.mark.parametrize("tp", [1, 3])
def test_mapping_round_trip_exact(cfg, tp):
    hf = random_hf_state(cfg)
    ranks = [hf_to_megatron(hf, cfg, r, tp) for r in range(tp)]
    assert ("output_layer.weight" in ranks[0]) == (not cfg["tie_embeddings"])
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_query_groups"]) * d
    h, f = cfg["hidden_size"], cfg["ffn_hidden_size"]
    assert (ranks[0]["decoder.layers.1.self_attention.linear_qkv.weight"].shape
            == (qkv_rows // tp, h))
    assert ranks[0]["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * f // tp, h)
    assert_same(megatron_to_hf(ranks, cfg), hf)


def test_mapping_vocab_padding_round_trip():
    cfg = dict(SMALL, vocab_size=31)
    hf = random_hf_state(cfg)
    ranks = [hf_to_megatron(hf, cfg, r, 3, padded_vocab_size=33) for r in range(3)]
    assert ranks[2]["embedding.word_embeddings.weight"].shape == (11, 24)
    assert torch.equal(ranks[2]["output_layer.weight"][-2:], torch.zeros(2, 24))
    assert_same(megatron_to_hf(ranks, cfg), hf)
    with pytest.raises(ValueError, match="padded_vocab_size"):
        hf_to_megatron(hf, cfg, 0, 3)


def test_mapping_rejects_tp_not_dividing_groups():
    with pytest.raises(ValueError, match="num_query_groups=3"):
        hf_to_megatron(random_hf_state(SMALL), SMALL, 0, 2)


def test_mapping_qkv_fc1_layout_hand_checked():
    """4 query heads, 2 KV groups, head dim 1, hidden 1: row values name the head."""
    cfg = {"num_layers": 1, "hidden_size": 4, "ffn_hidden_size": 4, "num_attention_heads": 4,
           "num_query_groups": 2, "kv_channels": 1, "vocab_size": 2, "tie_embeddings": True}
    col = lambda *v: torch.tensor(v, dtype=torch.float32)[:, None].repeat(1, 4)  # noqa: E731
    p = "model.layers.0."
    hf = {"model.embed_tokens.weight": col(0, 1), "model.norm.weight": torch.ones(4),
          p + "self_attn.q_proj.weight": col(0, 1, 2, 3),
          p + "self_attn.k_proj.weight": col(10, 11),
          p + "self_attn.v_proj.weight": col(20, 21),
          p + "self_attn.o_proj.weight": torch.arange(16.0).view(4, 4),
          p + "mlp.gate_proj.weight": col(0, 1, 2, 3),
          p + "mlp.up_proj.weight": col(10, 11, 12, 13),
          p + "mlp.down_proj.weight": torch.arange(16.0).view(4, 4),
          p + "input_layernorm.weight": torch.ones(4),
          p + "post_attention_layernorm.weight": torch.ones(4)}
    m = "decoder.layers.0."
    one = hf_to_megatron(hf, cfg, 0, 1)
    assert one[m + "self_attention.linear_qkv.weight"][:, 0].tolist() == [0, 1, 10, 20, 2, 3,
                                                                          11, 21]
    assert one[m + "mlp.linear_fc1.weight"][:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    r0, r1 = hf_to_megatron(hf, cfg, 0, 2), hf_to_megatron(hf, cfg, 1, 2)
    assert r0[m + "self_attention.linear_qkv.weight"][:, 0].tolist() == [0, 1, 10, 20]
    assert r1[m + "self_attention.linear_qkv.weight"][:, 0].tolist() == [2, 3, 11, 21]
    assert r0[m + "mlp.linear_fc1.weight"][:, 0].tolist() == [0, 1, 10, 11]
    assert r1[m + "mlp.linear_fc1.weight"][:, 0].tolist() == [2, 3, 12, 13]
    # row-parallel: rank 1 holds input columns 2..3 (the inputs from query heads 2, 3)
    assert r1[m + "self_attention.linear_proj.weight"].tolist() == [[2, 3], [6, 7], [10, 11],
                                                                    [14, 15]]
    assert r1[m + "mlp.linear_fc2.weight"][0].tolist() == [2, 3]
    assert r1["embedding.word_embeddings.weight"][:, 0].tolist() == [1]


_BUILD_GPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel(1, 1)
    from megatron.core.transformer import TransformerConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    c = json.loads(sys.argv[2])
    tc = TransformerConfig(num_layers=c["num_layers"], hidden_size=c["hidden_size"],
        ffn_hidden_size=c["ffn_hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_query_groups"], use_cpu_initialization=True,
        params_dtype=torch.float32, normalization="RMSNorm", gated_linear_unit=True,
        add_bias_linear=False, activation_func=torch.nn.functional.silu)
    out = {}
    for tie in (True, False):
        m = GPTModel(tc, get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=c["vocab_size"],
                     max_sequence_length=32, share_embeddings_and_output_weights=tie,
                     position_embedding_type="rope")
        out[str(tie)] = {k: list(v.shape) for k, v in m.state_dict().items()
                         if not k.endswith("_extra_state")}
    dist.destroy_process_group()
    print("KEYS" + json.dumps(out))
""")


@pytest.mark.slow  # ~10 s idle, ~40 s on a busy 2-core machine (megatron import + build)
@pytest.mark.timeout(300)
def test_mapping_names_match_megatron_gptmodel():
    """Keys and shapes equal those of a real GPTModel (local spec, TP=1), tied and untied."""
    import random

    port = str(random.randint(20000, 40000))
    proc = subprocess.run([sys.executable, "-c", _BUILD_GPT, port, json.dumps(SMALL)],
                          capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads(proc.stdout.split("KEYS", 1)[1])
    for tie in (True, False):
        cfg = dict(SMALL, tie_embeddings=tie)
        got = {k: list(v.shape) for k, v in hf_to_megatron(random_hf_state(cfg), cfg, 0, 1).items()}
        assert got == want[str(tie)]
