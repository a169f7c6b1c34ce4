"""The format interface: :class:`QuantFormat`, :class:`QuantizedTensor` and the STE autograd op.

A format is a frozen dataclass of its options (``NVFP4(block_size=16)``). Its numerics live in one
pure *kernel* function per format with the signature::

    kernel(x, amax, want_mask, *params) -> (fake_quantized x, clip mask or None)

The kernel is the eager reference and, unchanged, the input of ``torch.compile``
(see :mod:`megaquant.formats.fused`). ``fake_quantize`` wraps it in :class:`_FakeQuantSTE`, a
straight-through estimator that saves only a bool mask for backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from megaquant.formats import fused
from megaquant.formats.rounding import amax_per_axis, channel_shape, normalize_axis

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class QuantizedTensor:
    """What an exporter writes: integer/minifloat codes plus the scales that decode them.

    ``codes`` has the original shape (unpacked, one code per element); ``scale`` is the decode
    scale (value = code * scale [* global_scale]): float32 per tensor ([]), per channel (keepdim
    shape) or per block ([..., n_blocks], stored as float8_e4m3fn for NVFP4 and as uint8 E8M0
    biased exponents for MX). ``shape``/``dtype`` are those of the original tensor.
    """

    codes: Tensor
    scale: Tensor
    shape: torch.Size
    dtype: torch.dtype
    global_scale: Tensor | None = None
    format_name: str = ""


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a straight-through gradient, zero where saturation clipped.

    Saves only the bool clip mask (1 byte/element), never a float copy of the input.
    """

    @staticmethod
    def forward(ctx, x: Tensor, amax: Tensor | None, kernel: Callable, params: tuple) -> Tensor:
        out, keep = fused.run_kernel(kernel, x, amax, True, params)
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad,
                           torch.zeros((), dtype=grad.dtype, device=grad.device)), None, None, None


@dataclass(frozen=True)
class QuantFormat:
    """Abstract base of all formats; subclasses are frozen dataclasses checked in __post_init__."""

    name: ClassVar[str] = ""
    needs_amax: ClassVar[bool] = False

    # --- to be provided by subclasses ------------------------------------------------------
    def _kernel(self, x: Tensor) -> tuple[Callable, tuple]:
        """(pure kernel function, its static parameters) used by fake_quantize."""
        raise NotImplementedError

    def quantize(self, x: Tensor, amax: Tensor | None = None) -> QuantizedTensor:
        raise NotImplementedError

    def dequantize(self, q: QuantizedTensor) -> Tensor:
        raise NotImplementedError

    def _amax_reduce(self, x32: Tensor) -> Tensor:
        raise TypeError(
            f"{type(self).__name__} has no calibratable amax: its scales come from each block of "
            "the data. Do not attach a calibrator to it; call quantize(x) without amax."
        )

    # --- shared behaviour -------------------------------------------------------------------
    def compute_amax(self, x: Tensor) -> Tensor:
        """The statistic a calibrator collects (float32; NaN/inf in x show up in it)."""
        if not self.needs_amax:
            self._amax_reduce(x)  # raises the TypeError
        check_input(x, self)
        return self._amax_reduce(x.detach().float())

    def fake_quantize(self, x: Tensor, amax: Tensor | None = None) -> Tensor:
        """dequantize(quantize(x, amax)), bit-exactly, with a straight-through gradient."""
        check_input(x, self)
        amax = self._prepare_amax(x, amax)
        kernel, params = self._kernel(x)
        amax = self._kernel_amax(amax)
        if x.requires_grad and torch.is_grad_enabled():
            return _FakeQuantSTE.apply(x, amax, kernel, params)
        out, _ = fused.run_kernel(kernel, x, amax, False, params)
        return out

    def _kernel_amax(self, amax: Tensor | None) -> Tensor | None:
        """What the kernel receives for a static amax (NVFP4 precomputes its global scale)."""
        return amax

    def _amax_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape a static amax must have for ``x`` ([] per tensor)."""
        return ()

    def _prepare_amax(self, x: Tensor, amax: Tensor | None) -> Tensor | None:
        """Validate a static amax and bring it to float32 on x's device in its keepdim shape."""
        if amax is None:
            return None
        if not self.needs_amax:
            raise TypeError(
                f"{type(self).__name__} takes no amax (its scales come from each block); "
                "call it without amax."
            )
        if not isinstance(amax, Tensor):
            amax = torch.tensor(amax)
        want = self._amax_shape(x)
        if amax.numel() != max(1, _prod(want)):
            raise ValueError(
                f"{type(self).__name__}: amax has shape {tuple(amax.shape)} but x of shape "
                f"{tuple(x.shape)} needs {want or '[] (per tensor)'}; compute it with "
                "fmt.compute_amax(x) on calibration data of the same layout."
            )
        return amax.detach().to(device=x.device, dtype=torch.float32).reshape(want)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_input(x: Tensor, fmt: QuantFormat) -> None:
    if not isinstance(x, Tensor) or x.dtype not in SUPPORTED_DTYPES:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            f"{type(fmt).__name__} quantizes float32/bfloat16/float16 tensors, got {got}; "
            "cast the input first."
        )


def check_choice(fmt: QuantFormat, field: str, value, choices) -> None:
    """ValueError naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(
            f"{type(fmt).__name__}: {field}={value!r} is not valid; "
            f"choose one of {sorted(choices, key=str)}."
        )


class PerAxisAmax:
    """Amax methods of a format with one amax per tensor (``axis`` None) or per channel along
    ``axis`` (FP8, INT8): list it before QuantFormat in the bases."""

    def _axis(self, x: Tensor) -> int | None:
        return normalize_axis(self.axis, max(x.dim(), 1), type(self).__name__)

    def _amax_reduce(self, x32: Tensor) -> Tensor:
        return amax_per_axis(x32, self._axis(x32))

    def _amax_shape(self, x: Tensor) -> tuple[int, ...]:
        return channel_shape(x.shape, self._axis(x))


def check_axis(fmt: QuantFormat, axis) -> None:
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise ValueError(f"{type(fmt).__name__}: axis={axis!r} is not valid; use None (per tensor) "
                         "or an int.")


def check_block_size(fmt: QuantFormat, block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(
            f"{type(fmt).__name__}: block_size={block_size!r} is not valid; use a positive int "
            f"(default {type(fmt).__dataclass_fields__['block_size'].default})."
        )


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
