"""Text for calibration and evaluation, and its cutting into token windows.

Any UTF-8 file works (config keys ``data.calib_text`` / ``data.eval_text``); without one the
jobs use the demo's Shakespeare texts (:mod:`megaquant.demo.shakespeare`, re-exported here:
:func:`default_calib_text`, :func:`default_eval_text`).

Windows: :func:`token_batches` tokenizes a file and cuts ``num_samples`` contiguous,
non-overlapping windows of ``seq_len + 1`` tokens (inputs ``[:, :-1]``, labels ``[:, 1:]``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaquant.demo.shakespeare import (  # noqa: F401  (the jobs' default texts)
    CALIB_PLAYS,
    EVAL_PLAY,
    default_calib_text,
    default_eval_text,
    shakespeare_texts,
    strip_gutenberg,
)


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
                  offset: int = 0,
                  config_key: str = "data.calib_text / data.eval_text") -> torch.Tensor:
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
