"""Compatibility shim (one release): the max calibrator is :mod:`megaquant.calibrator`."""

from megaquant.calibrator import MaxCalibrator  # noqa: F401
