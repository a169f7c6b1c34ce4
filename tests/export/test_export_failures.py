"""Atomic writes, refusals with reasons, tied embeddings and tokenizer files."""

import errno
import json

import pytest
import torch

from tests.export import reference_reader as R
from tests.export.export_helpers import quantized_tiny


@pytest.fixture(scope="module")
def fp8_model(megatron_single):
    return quantized_tiny("fp8", megatron_single.dp_group)


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_non_empty_target_without_overwrite(fp8_model, tmp_path):
    from megaquant.export import export_model

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass overwrite=true"):
        export_model(*fp8_model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and _no_leftovers(tmp_path)
    export_model(*fp8_model, target, overwrite=True)  # replaced atomically
    assert sorted(p.name for p in target.iterdir()) == ["compressed-tensors", "export_report.json",
                                                        "modelopt"]
    assert _no_leftovers(tmp_path)


def test_export_disk_full_leaves_nothing_and_says_why(fp8_model, tmp_path, monkeypatch):
    from megaquant.export import export_model, writer

    calls = []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first layout is on disk already when the second fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    real = writer.save_file
    monkeypatch.setattr(writer, "save_file", full_disk)
    with pytest.raises(OSError, match="nothing was written.*No space left"):
        export_model(*fp8_model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_bad_path_and_unsupported_scheme_write_nothing(fp8_model, tmp_path, megatron_single):
    from megaquant.export import export_model

    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot create the export directory"):
        export_model(*fp8_model, tmp_path / "file" / "out")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export_model(*fp8_model, tmp_path / "file")
    model, cfg = quantized_tiny("int8", megatron_single.dp_group)
    with pytest.raises(ValueError, match="not an exportable scheme.*nvfp4"):
        export_model(model, cfg, tmp_path / "int8")
    model, cfg = quantized_tiny("fp8_per_channel", megatron_single.dp_group)
    with pytest.raises(ValueError, match="cannot be written as \\['modelopt'\\]"):
        export_model(model, cfg, tmp_path / "pc", layouts=["modelopt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_export_refuses_ragged_blocks(megatron_single, tmp_path):
    from megaquant.export import export_model

    model, cfg = quantized_tiny("int4_w4a16", megatron_single.dp_group, hidden_size=64,
                                ffn_hidden_size=128)
    with pytest.raises(ValueError, match="not a multiple of the int4 block size 128"):
        export_model(model, cfg, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_export_tied_embeddings_stay_tied_and_tokenizer_is_written(megatron_single, tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from megaquant.export import export_model
    from megaquant.tokenizer import Tokenizer, tokenizer_from_hf_dir

    vocab = {chr(i): i for i in range(32, 127)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    model, cfg = quantized_tiny("nvfp4", megatron_single.dp_group, tie_embeddings=True)
    export_model(model, cfg, tmp_path / "x", tokenizer=Tokenizer(tok, bos_id=33, eos_id=34))
    for layout in ("modelopt", "compressed-tensors"):
        d = tmp_path / "x" / layout
        sd = R.load_tensors(d)
        config = json.loads((d / "config.json").read_text())
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in sd
        assert (config["bos_token_id"], config["eos_token_id"]) == (33, 34)
        assert torch.equal(sd["model.embed_tokens.weight"],
                           model.embedding.word_embeddings.weight.detach())
        back = tokenizer_from_hf_dir(d)
        assert back.encode("hello") == [vocab[c] for c in "hello"] and back.bos_id == 33
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert report["tokenizer"] is True and "lm_head" in report["excluded_modules"]
