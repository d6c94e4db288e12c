"""Intensity mapping shared by the DICOM and NIfTI readers (kept free of pydicom and nibabel)."""

from __future__ import annotations

import numpy as np

PERCENTILES = (0.5, 99.5)


def window_range(values: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """The values mapped to 0 and 1: a (center, width) window, else the 0.5-99.5 percentiles.

    Percentiles skip NaN and inf so one bad value does not spoil the whole mapping.
    """
    if window is not None:
        center, width = window
        return center - width / 2, center + width / 2
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, PERCENTILES)
    return float(low), float(high)


def to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] to [0, 1] float32 and clip; NaN and inf stay for `prepare` to refuse."""
    unit = ((values - low) / (high - low if high > low else 1.0)).astype(np.float32, copy=False)
    finite = np.isfinite(unit)
    unit[finite] = np.clip(unit[finite], 0.0, 1.0)
    return unit
