"""megaquant.tokenizer: the SmolLM2 tokenizer rebuilt from GGUF metadata, and tokenizer.json."""

import json

from megaquant.data import default_eval_text
from megaquant.tokenizer import tokenizer_from_hf_dir

UNICODE = "naïve café — Grüße, 日本語のテキスト, emoji 😀👍🏽, tabs\tand  double  spaces\n\r\nend"


def test_tokenizer_round_trip_shakespeare(smollm2):
    tok = smollm2[2]
    text = default_eval_text().read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 35_000 < len(ids) < 60_000  # ~4 characters per token on English prose
    assert max(ids) < tok.vocab_size


def test_tokenizer_round_trip_unicode(smollm2):
    tok = smollm2[2]
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


def test_tokenizer_smollm2_specifics(smollm2):
    tok = smollm2[2]
    assert tok.vocab_size == 49152 and tok.bos_id == 1 and tok.eos_id == 2
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("Hello world 2024")]
    # byte-level BPE: leading space is part of the word ("Ġ"); digits are split one by one
    assert pieces == ["Hello", "Ġworld", "Ġ", "2", "0", "2", "4"]
    assert tok.encode("<|im_start|>user")[0] == 1  # control tokens match as one token


def test_tokenizer_from_hf_dir(smollm2, tmp_path):
    tok = smollm2[2]
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    hf_tok = tokenizer_from_hf_dir(tmp_path)
    assert hf_tok.encode(UNICODE) == tok.encode(UNICODE)
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.vocab_size) == (1, 2, 49152)
