"""Pixel handling shared by every format: grey conversion, square fit, resize, quantisation."""

from __future__ import annotations

import numpy as np
from PIL import Image

# ITU-R BT.601 luma: the conversion Pillow's "L" mode uses, so a colour PNG gives the same grey
# levels here as in any viewer that greys it.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_grey(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """[H, W] or [H, W, C] -> [H, W]; the flag says whether colour was folded into grey."""
    if image.ndim == 2:
        return image, False
    channels = image.shape[2]
    if channels == 1:
        return image[:, :, 0], False
    if channels == 2:  # grey + alpha
        return image[:, :, 0], False
    return image[:, :, :3] @ _LUMA, True


def fit_square(image: np.ndarray, mode: str) -> np.ndarray:
    """Make a 2-D image square: center-crop, zero-pad, or leave it for `resize` to stretch."""
    height, width = image.shape
    if height == width or mode == "stretch":
        return image
    side = min(height, width) if mode == "crop" else max(height, width)
    if mode == "crop":
        top, left = (height - side) // 2, (width - side) // 2
        return image[top:top + side, left:left + side]
    out = np.zeros((side, side), dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top:top + height, left:left + width] = image
    return out


def resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """Lanczos resampling in float (antialiased going down, sharp going up), clipped to [0, 1]."""
    if image.shape == (resolution, resolution):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (resolution, resolution), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def quantize(image: np.ndarray, bit_depth: int) -> np.ndarray:
    top = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(image, 0.0, 1.0) * top).astype(dtype)
