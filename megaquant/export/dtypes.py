"""The dtype of everything an export does not quantize (embeddings, norms, routers, ``lm_head``).

``dtype="auto"`` is the dtype the source model was trained / published in: what the PTQ job
recorded as the checkpoint's ``source_dtype`` (SmolLM2: bfloat16; an HF directory: its
config.json ``dtype``), else the model's ``params_dtype``. ``bfloat16``, ``float16`` and
``float32`` choose explicitly. Quantized tensors (codes, scales) keep the dtypes their layout
declares whatever is chosen: scales stay float32 so the export decodes to exactly the weights the
fake-quantized model computed with.

Casting down rounds each value to nearest; float16 cannot hold magnitudes above 65504, so a tensor
that exceeds it is an error naming the tensor rather than a silent ``inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)


def resolve_dtype(choice: str, auto: str) -> torch.dtype:
    """``choice`` (one of CHOICES) as a torch dtype; ``auto`` resolves to ``auto``'s name."""
    if choice not in CHOICES:
        raise ValueError(f"export dtype={choice!r} is not valid; choose one of {list(CHOICES)} "
                         "(auto: the source model's training dtype)")
    name = auto if choice == "auto" else choice
    if name not in DTYPES:
        raise ValueError(f"export dtype=auto resolved to {name!r}, which is not one of "
                         f"{list(DTYPES)}; pass dtype explicitly")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cast_unquantized(tensors: dict[str, Tensor], skip: set[str], dtype: torch.dtype) -> dict:
    """Floating tensors not in ``skip`` cast to ``dtype`` (float16: refused beyond its range)."""
    out = {}
    for name, t in tensors.items():
        if name in skip or not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        if dtype == torch.float16:
            big = t.detach().abs().amax().item() if t.numel() else 0.0
            limit = torch.finfo(torch.float16).max
            if big > limit:
                raise ValueError(f"{name} holds values up to {big:.6g}, beyond float16's "
                                 f"{limit:.0f}: export it with dtype=bfloat16 or float32")
        out[name] = t.to(dtype)
    return out
