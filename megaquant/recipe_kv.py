"""A recipe's ``kv_cache:`` section: how the keys and values written to the KV cache are quantized.

At long context the KV cache, not the weights, fills the GPU; every engine that reads our exports
can store it in FP8 (E4M3), and Blackwell engines in NVFP4. Any recipe may add::

    kv_cache: {format: fp8}                    # per-layer static scale = amax / 448, by max calib
    kv_cache: {format: fp8, scale: unit}       # fixed scale 1.0 (ModelOpt's ``fp8_cast``), opt-in
    kv_cache: {format: nvfp4}                  # E2M1 + E4M3 block scales (16 along head_dim)
                                               # + a per-layer global scale from amax

The quantizers sit in the core attention (``k_quantizer`` / ``v_quantizer``) on the keys after
RoPE and on the values: what an engine writes into its cache. One static amax per layer and per
tensor (K and V), calibrated by max with the rest of PTQ; heads are split over TP, so the amax
is a MAX over TP and DP (:mod:`megaquant.calib.sync`).

``scale: unit`` stores amax = 448 (FP8's largest value), so the scale is exactly 1.0: what
ModelOpt's ``fp8_cast`` KV config and vLLM's default without scales do. It is an explicit opt-in
because it invents a scale instead of measuring one: values beyond 448 saturate.

Formats no engine reads as a KV cache (INT4, INT8, MX) are refused here, naming the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaquant.strict import check_keys

KV_FORMATS = ("fp8", "nvfp4")
KV_SCALES = ("calibrated", "unit")
FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class KVCacheConfig:
    """``format``: one of :data:`KV_FORMATS`; ``scale``: ``calibrated`` (amax by max calibration)
    or ``unit`` (FP8 only: a fixed scale of 1.0)."""

    format: str
    scale: str = "calibrated"

    def __post_init__(self):
        if self.format not in KV_FORMATS:
            raise ValueError(f"kv_cache.format {self.format!r} is not a KV-cache format the "
                             f"engines read; valid choices: {list(KV_FORMATS)}")
        if self.scale not in KV_SCALES:
            raise ValueError(f"kv_cache.scale {self.scale!r}: valid choices: {list(KV_SCALES)}")
        if self.scale == "unit" and self.format != "fp8":
            raise ValueError("kv_cache.scale 'unit' (a fixed scale of 1.0) is defined for fp8 "
                             "only; NVFP4 KV needs a calibrated global scale: scale: calibrated")

    @classmethod
    def from_dict(cls, d, where: str) -> "KVCacheConfig | None":
        if d is None:
            return None
        if isinstance(d, str):
            d = {"format": d}
        if not isinstance(d, dict) or "format" not in d:
            raise ValueError(f"{where}: expected a mapping with a 'format' key "
                             f"(one of {list(KV_FORMATS)}), got {d!r}")
        check_keys(d, cls, where)
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def to_dict(self) -> dict:
        return {"format": self.format, "scale": self.scale}

    @property
    def fixed_amax(self) -> float | None:
        """The amax stored instead of calibrating (None: calibrate)."""
        return FP8_E4M3_MAX if self.scale == "unit" else None
