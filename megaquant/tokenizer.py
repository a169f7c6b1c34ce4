"""The tokenizer: a thin wrapper over ``tokenizers.Tokenizer`` built offline.

Two sources:

* a GGUF file's metadata (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` / bos/eos ids):
  :func:`tokenizer_from_gguf` rebuilds a GPT-2-style byte-level BPE from them, no hub needed;
* a Hugging Face model directory with ``tokenizer.json``: :func:`tokenizer_from_hf_dir`.

Byte-level BPE maps every byte to a printable symbol before merging (a space becomes ``Ġ``), so any
UTF-8 text encodes losslessly and ``decode(encode(text)) == text``. SmolLM2's pre-tokenizer (GGUF
``tokenizer.ggml.pre == 'smollm'``) first splits digits one by one, then applies the GPT-2 regex.
Special (control) tokens such as ``<|im_start|>`` are registered so they match as one token.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

_CONTROL = 3  # llama.cpp token_type for control tokens (1 is normal)


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, plus ``vocab_size``, ``bos_id``,
    ``eos_id``. No BOS/EOS is added by ``encode``: callers that want one prepend it."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None):
        self._tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for saving as tokenizer.json on export)."""
        return self._tok


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp splits these on single digits first, then applies the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; supported: "
                     "smollm, starcoder, refact, default, gpt2. "
                     "Use tokenizer_from_hf_dir with the model's tokenizer.json instead.")


def tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer from GGUF metadata (see :func:`read_gguf_metadata`)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2', byte-level "
                         "BPE); use tokenizer_from_hf_dir with the model's tokenizer.json")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or []
    specials = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                            for s in specials])
    assert tok.get_vocab_size(with_added_tokens=True) == len(tokens), "special tokens changed ids"
    return Tokenizer(tok, bos_id=_opt_int(metadata.get("tokenizer.ggml.bos_token_id")),
                     eos_id=_opt_int(metadata.get("tokenizer.ggml.eos_token_id")))


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def tokenizer_from_hf_dir(directory: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a local Hugging Face model directory.

    BOS/EOS ids come from ``config.json`` (``bos_token_id`` / ``eos_token_id``) when present.
    """
    import json

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: megaquant needs the fast-tokenizer file "
                                "tokenizer.json (save it with tokenizer.save_pretrained(dir))")
    tok = tokenizers.Tokenizer.from_file(str(path))
    config = {}
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())

    def first(v):
        return v[0] if isinstance(v, list) else v

    return Tokenizer(tok, bos_id=_opt_int(first(config.get("bos_token_id"))),
                     eos_id=_opt_int(first(config.get("eos_token_id"))))
