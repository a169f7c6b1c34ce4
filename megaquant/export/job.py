"""The export job behind ``scripts/export.py``: one process, a PTQ checkpoint in, HF directories
out.

The checkpoint may have been saved at any TP/EP layout: it is loaded at TP=1, EP=1 here (Megatron's
distributed checkpoint gathers the shards), so the export does not depend on how PTQ was run.
This is the outermost layer: it alone sets up the (one-rank) process group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from megaquant import strict

log = logging.getLogger("megaquant.export")
TOKENIZER_CHOICES = "auto | none | smollm2 | <directory with tokenizer.json>"
# what a serving engine reads beside the weights, copied from a Hugging Face source checkpoint
ENGINE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ExportConfig:
    """``configs/export.yaml``; unknown keys are errors naming the valid ones."""

    checkpoint: str
    output_dir: str
    layouts: object = "auto"  # "auto" or a list of layout names
    overwrite: bool = False
    max_shard_bytes: int = 5 * 1024**3
    tokenizer: str = "auto"
    # unquantized tensors: auto (source training dtype) | bfloat16 | float16 | float32
    dtype: str = "auto"
    timeout_s: float = 600.0

    @classmethod
    def from_dict(cls, d: dict) -> "ExportConfig":
        return strict.from_dict(cls, d, "export config")


def resolve_tokenizer(choice: str, arch_name: str, source: str | None = None):
    """The tokenizer to write: ``auto`` takes the one the checkpoint was made with (``source``,
    recorded by PTQ: an HF directory, or "smollm2"), the embedded SmolLM2 one for that model,
    else none."""
    if choice == "auto":
        if source and source != "bytes" and (source == "smollm2" or Path(source).is_dir()):
            choice = source
        else:
            choice = "smollm2" if arch_name.startswith("SmolLM2") else "none"
    if choice in ("none", None):
        return None
    if choice == "smollm2":
        from megaquant.demo.gguf import read_gguf_metadata
        from megaquant.demo.smollm2 import smollm2_gguf_path
        from megaquant.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(read_gguf_metadata(smollm2_gguf_path()))
    if not Path(choice).is_dir():
        raise ValueError(f"tokenizer={choice!r}: expected {TOKENIZER_CHOICES}")
    from megaquant.tokenizer import tokenizer_from_hf_dir

    return tokenizer_from_hf_dir(choice)


def run(cfg: ExportConfig):
    """Export ``cfg.checkpoint`` to ``cfg.output_dir``; returns the ExportReport."""
    from megaquant.export.export import export_checkpoint
    from megaquant.megatron.checkpoint import read_metadata
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("run the export as one process (python scripts/export.py ...): it loads "
                         "the checkpoint at TP=1, EP=1 whatever layout it was saved at")
    from megaquant.export.writer import check_target

    meta = read_metadata(cfg.checkpoint)["metadata"]  # fail fast: a wrong path or target
    check_target(Path(cfg.output_dir).absolute(), bool(cfg.overwrite))
    from megaquant.export.dtypes import resolve_dtype

    resolve_dtype(str(cfg.dtype), "float32")  # fail fast on a bad dtype name
    tokenizer = resolve_tokenizer(cfg.tokenizer, meta.get("arch", {}).get("name", ""),
                                  meta.get("tokenizer"))
    source = (cfg.tokenizer if cfg.tokenizer not in ("auto", "none", "smollm2")
              else meta.get("tokenizer"))
    engine_files = [Path(source) / f for f in ENGINE_FILES
                    if tokenizer is not None and source and (Path(source) / f).is_file()]
    init_distributed(timeout_s=float(cfg.timeout_s))
    init_model_parallel(tp=1, pp=1, ep=1)
    layouts = cfg.layouts if isinstance(cfg.layouts, str) else list(cfg.layouts)
    report = export_checkpoint(cfg.checkpoint, cfg.output_dir, layouts=layouts,
                               tokenizer=tokenizer, overwrite=bool(cfg.overwrite),
                               dtype=str(cfg.dtype), engine_files=engine_files,
                               max_shard_bytes=int(cfg.max_shard_bytes))
    log.info("exported %s to %s: %s", cfg.checkpoint, cfg.output_dir, report.summary())
    for layout, why in report.skipped_layouts.items():
        log.info("not written: %s (%s)", layout, why)
    for layout, info in report.layouts.items():
        for note in info.get("notes", []):
            log.warning("%s: %s", layout, note)
    return report
