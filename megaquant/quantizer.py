"""The fake-quant module: one format, one amax, one mode. Nothing else lives here.

A quantized layer owns one :class:`TensorQuantizer` per tensor role (``input_quantizer``,
``weight_quantizer``, ``output_quantizer``). Each is in one of four modes:

* ``off``:       identity.
* ``calibrate``: identity, but every input is folded into a calibrator (max by default), whose
                 result :meth:`TensorQuantizer.load_calib_amax` turns into the static amax.
* ``static``:    fake-quantize with the stored ``amax`` buffer (the PTQ/QAT steady state).
* ``dynamic``:   fake-quantize with an amax computed from each input.

Formats whose scales come entirely from each block of the data (MXFP8, MXFP4, INT4) have no amax:
for them ``static`` and ``dynamic`` are the same thing and calibration collects nothing.

The ``amax`` buffer is always registered (empty until calibrated) so that every layer of a model
carries the same state-dict keys, which Megatron's distributed checkpointing needs to stack layers.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from megaquant.calibrator import MaxCalibrator
from megaquant.formats import QuantFormat

MODES = ("off", "calibrate", "static", "dynamic")


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor role of a layer. See the module docstring for the modes."""

    def __init__(self, fmt: QuantFormat | None = None, mode: str = "off"):
        super().__init__()
        self.register_buffer("amax", torch.empty(0), persistent=True)
        self.fmt: QuantFormat | None = None
        self.mode = "off"
        self.calibrator: MaxCalibrator | None = None
        self.name = ""  # set by megaquant.convert for error messages; not state
        self._collected = 0  # batches seen while calibrating
        # 1-based index of the first batch whose statistic was non-finite (0: none), kept on
        # the calibrator's device so that checking costs no host sync per batch.
        self._first_nonfinite: torch.Tensor | None = None
        # Learnable scales (megaquant.formats.lsq): ``amax`` becomes an nn.Parameter under the
        # same state-dict key, and ``block_amax`` ([..., n_blocks]) one for per-block weights.
        self.learnable = False
        if fmt is not None:
            self.configure(fmt, mode)
        elif mode != "off":
            raise ValueError(f"mode {mode!r} needs a format; pass fmt=... or use mode='off'")

    # ----------------------------------------------------------------- configuration
    def configure(self, fmt: QuantFormat | None, mode: str) -> None:
        """Set the format and mode; ``fmt=None`` is only valid with ``mode='off'``."""
        if mode not in MODES:
            raise ValueError(f"unknown quantizer mode {mode!r}; valid modes: {', '.join(MODES)}")
        if fmt is None and mode != "off":
            raise ValueError(f"mode {mode!r} needs a format")
        if fmt is not None and not isinstance(fmt, QuantFormat):
            raise TypeError(f"fmt must be a megaquant.formats.QuantFormat, got "
                            f"{type(fmt).__name__}")
        self.fmt, self.mode = fmt, mode
        if mode == "calibrate":
            self.calibrator = MaxCalibrator(fmt) if fmt.needs_amax else None
            self._collected, self._first_nonfinite = 0, None

    @property
    def is_enabled(self) -> bool:
        return self.mode != "off"

    @property
    def has_amax(self) -> bool:
        return self.amax.numel() > 0

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "calibrate":
            self.collect(x)
            return x
        if self.learnable:
            from megaquant.formats.lsq import learnable_fake_quantize

            return learnable_fake_quantize(self.fmt, x, self.amax if self.fmt.needs_amax else None,
                                           getattr(self, "block_amax", None))
        if self.mode == "dynamic" or not self.fmt.needs_amax:
            return self.fmt.fake_quantize(x)
        if not self.has_amax:
            raise RuntimeError(
                f"quantizer {self.name or '(unnamed)'} is static but has no amax: calibrate the "
                "model first (megaquant.quantize(model, recipe, forward_loop)) or use amax: dynamic"
            )
        return self.fmt.fake_quantize(x, self.amax)

    # ----------------------------------------------------------------- calibration
    def collect(self, x: torch.Tensor) -> None:
        """Fold one tensor into the calibrator; non-finite values are recorded, not raised.

        Raising here would leave the other ranks of a parallel job blocked in their next
        collective; instead the batch index is remembered and every rank raises together after
        the calibration loop (see megaquant.calib.sync.check_finite), which reads the index
        once per quantizer.
        """
        self._collected += 1
        if self.calibrator is None:
            return
        self.calibrator.collect(x)
        finite = torch.isfinite(self.calibrator.compute_amax()).all()
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.zeros((), dtype=torch.int64, device=finite.device)
        # Device-side "first bad batch": no .item() here, one read after the loop.
        unset = self._first_nonfinite == 0
        self._first_nonfinite = torch.where(unset & ~finite, self._collected,
                                            self._first_nonfinite)

    @property
    def first_nonfinite_batch(self) -> int | None:
        """The 1-based index of the first non-finite batch, or None (reads the device once)."""
        if self._first_nonfinite is None:
            return None
        return int(self._first_nonfinite) or None

    def calib_amax(self) -> torch.Tensor | None:
        """The calibrator's current statistic, or None when it saw nothing."""
        return None if self.calibrator is None else self.calibrator.compute_amax()

    def load_amax(self, amax: torch.Tensor) -> None:
        """Store ``amax`` (float32, on this module's device) as the static amax."""
        if isinstance(self.amax, nn.Parameter):  # learnable: keep the parameter object
            with torch.no_grad():
                self.amax.copy_(amax.reshape(self.amax.shape))
            return
        self.amax = amax.detach().to(dtype=torch.float32, device=self.amax.device).clone()

    def finish_calibration(self) -> None:
        """Calibrate -> static: the collected amax (if any) becomes the buffer."""
        assert self.mode == "calibrate", f"{self.name}: finish_calibration outside calibrate mode"
        amax = self.calib_amax()
        if amax is not None:
            self.load_amax(amax)
        self.mode, self.calibrator = "static", None

    # ----------------------------------------------------------------- learnable scales
    def make_learnable(self, weight: torch.Tensor | None = None) -> None:
        """Turn the static amax (and, given ``weight``, its per-block amax) into parameters.

        Forward values do not change (the learnable kernel is bit-exact with the fixed one at
        the same scales); only the scales start receiving gradients. ``weight``: the tensor
        this quantizer quantizes, for per-block scales (NVFP4/INT4 weights); None: the global
        amax only. Errors name the quantizer and what fits (megaquant.formats.lsq).
        """
        from megaquant.formats.lsq import check_learnable, initial_block_amax

        who = f"quantizer {self.name or '(unnamed)'}"
        if self.mode != "static":
            raise ValueError(f"{who}: learnable scales need a static quantizer (calibrated or "
                             f"loaded), not mode {self.mode!r}; calibrate before enabling them")
        check_learnable(self.fmt, weight is not None, who)
        if self.fmt.needs_amax:
            if not self.has_amax:
                raise ValueError(f"{who}: no amax to learn; calibrate the model first")
            if not isinstance(self.amax, nn.Parameter):
                amax = self._buffers.pop("amax")
                self.amax = nn.Parameter(amax.detach().clone().float())
        if weight is not None and not hasattr(self, "block_amax"):
            self.block_amax = nn.Parameter(initial_block_amax(self.fmt, weight))
        self.learnable = True

    # ----------------------------------------------------------------- state
    def _apply(self, fn, recurse=True):
        # The amax stays float32 under dtype casts: Megatron's Float16Module calls
        # ``module.bfloat16()`` on the whole model (Bridge wraps after the pre-wrap hook
        # converted it), which would round calibrated scales to 8 mantissa bits. Devices move.
        # Learned scales (parameters, changed in place by _apply) keep float32 the same way.
        before = {k: t.data for k, t in self._parameters.items()} | {"amax": self.amax.data}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            t = getattr(self, name)
            if t.dtype != old.dtype:
                if isinstance(t, nn.Parameter):
                    t.data = old.to(device=t.device)
                else:
                    setattr(self, name, old.to(device=t.device))
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The buffer starts empty; adopt the checkpoint's shape (scalar, per-channel, ...)
        # instead of refusing it as a size mismatch.
        key = prefix + "amax"
        if (key in state_dict and state_dict[key].shape != self.amax.shape
                and not isinstance(self.amax, nn.Parameter)):
            self.amax = torch.empty_like(state_dict[key], device=self.amax.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A parent layer's state dict (no quantizer state) loads unchanged into a quantized
        # layer: an absent amax just means "not calibrated yet".
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        if self.fmt is None:
            return "off"
        if not self.has_amax:
            amax = "none"
        elif self.amax.numel() == 1:
            amax = f"{self.amax.item():.4g}"
        else:
            lo, hi = self.amax.min().item(), self.amax.max().item()
            amax = f"[{lo:.4g}..{hi:.4g}] x{self.amax.numel()}"
        return f"{self.fmt}, mode={self.mode}, amax={amax}"


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """All (qualified name, quantizer) pairs of a model."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def disable_quantizers(model: nn.Module) -> dict[str, str]:
    """Turn every quantizer off; returns the previous modes for :func:`enable_quantizers`."""
    saved = {}
    for name, q in iter_quantizers(model):
        saved[name] = q.mode
        q.mode = "off"
    return saved


def enable_quantizers(model: nn.Module, modes: dict[str, str]) -> None:
    """Restore the modes returned by :func:`disable_quantizers`."""
    for name, q in iter_quantizers(model):
        if name in modes:
            q.mode = modes[name]
