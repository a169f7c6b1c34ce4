"""Rotary position embedding frequencies, with the context-extension scalings we implement.

RoPE rotates each pair of channels ``(i, i + d/2)`` of a head of ``d`` channels by the angle
``position * inv_freq[i]`` with ``inv_freq[i] = base ** (-2i / d)``. Context-extension methods
change ``inv_freq`` only (the ones we accept do not scale the attention logits), so one function
computes it and :func:`megaquant.models.gpt.build_gpt_model` installs it in Megatron's
``RotaryEmbedding`` -- every variant then runs through the same Megatron code path.

Scalings (Hugging Face ``rope_type`` names):

* ``linear`` (position interpolation): ``inv_freq / factor``.
* ``llama3`` (Llama-3.1/3.2): wavelengths ``2*pi/inv_freq`` longer than
  ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``; those shorter
  than ``original / high_freq_factor`` are kept; in between, a linear blend in
  ``original / wavelength``. Megatron 0.16.1's ``rope_scaling=True`` fixes low 1, high 4 and
  original 8192 (Llama-3.1's values); we take all four from the config instead.
* ``dynamic`` (NTK-aware, recomputed when a sequence exceeds ``max_position_embeddings``):
  identical to no scaling for every sequence up to ``max_position_embeddings``, and megaquant
  refuses longer ``seq_length`` (:class:`megaquant.models.gpt.GPTConfig`), so it is the plain
  frequencies.

Anything else (``yarn``, ``longrope``, ``su``, ...) changes the attention scale or is
position-dependent: refused by name rather than run with the wrong math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch

ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling as stored in ``GPTConfig.rope_scaling`` (a plain dict there)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not implemented; "
                             f"megaquant implements {ROPE_TYPES}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            need = {"low_freq_factor": self.low_freq_factor,
                    "high_freq_factor": self.high_freq_factor,
                    "original_max_position_embeddings": self.original_max_position_embeddings}
            missing = [k for k, v in need.items() if v is None]
            if missing:
                raise ValueError(f"llama3 rope scaling needs {missing}")
            if not self.high_freq_factor > self.low_freq_factor:
                raise ValueError(f"llama3 rope scaling needs high_freq_factor "
                                 f"({self.high_freq_factor}) > low_freq_factor "
                                 f"({self.low_freq_factor})")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RopeScaling":
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown rope_scaling keys {unknown}; valid keys: {valid}")
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


def rope_inv_freq(dim: int, base: float, scaling: Optional[RopeScaling] = None,
                  device=None) -> torch.Tensor:
    """``inv_freq`` ([dim // 2], float32) of a head of ``dim`` rotary channels."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if scaling is None or scaling.rope_type in ("default", "dynamic"):
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3(inv_freq, scaling)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama-3.1's frequency-dependent interpolation (see the module docstring)."""
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)
