"""Planted near-copies: training images perturbed the way a leak would look in a synthetic set.

A generator that memorised a training image rarely returns it bit for bit: it returns it a little
noisy, shifted, re-exposed or blurred. The filter must catch every such copy, and the audit
plants them to show it does. Each perturbation is mild enough that a radiologist would call the
result the same image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

Perturbation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def gaussian_noise(images: np.ndarray, rng: np.random.Generator, std: float = 0.03) -> np.ndarray:
    return images + rng.normal(0.0, std, images.shape)


def shift(images: np.ndarray, rng: np.random.Generator, max_pixels: int = 3) -> np.ndarray:
    """A shift of 1..max_pixels in a random direction, edges repeated (no wrap-around)."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        dy, dx = 0, 0
        while dy == 0 and dx == 0:
            dy, dx = rng.integers(-max_pixels, max_pixels + 1, 2)
        out[i] = ndimage.shift(image, (dy, dx), order=0, mode="nearest")
    return out


def contrast(images: np.ndarray, rng: np.random.Generator, amount: float = 0.1) -> np.ndarray:
    """Contrast scaled by 1 +- amount about each image's mean."""
    factor = 1 + amount * rng.choice([-1.0, 1.0], len(images))[:, None, None]
    mean = images.mean(axis=(1, 2), keepdims=True)
    return (images - mean) * factor + mean


def brightness(images: np.ndarray, rng: np.random.Generator, amount: float = 0.1) -> np.ndarray:
    return images + amount * rng.choice([-1.0, 1.0], len(images))[:, None, None]


def blur(images: np.ndarray, rng: np.random.Generator, sigma: float = 0.7) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(image, sigma, mode="nearest") for image in images])


def _combined(*steps: Perturbation) -> Perturbation:
    def apply(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for step in steps:
            images = step(images, rng)
        return images
    return apply


PERTURBATIONS: dict[str, Perturbation] = {
    "noise": gaussian_noise,
    "shift": shift,
    "contrast": contrast,
    "brightness": brightness,
    "blur": blur,
    "shift+noise": _combined(shift, gaussian_noise),
    "contrast+brightness": _combined(contrast, brightness),
    "blur+noise": _combined(blur, gaussian_noise),
    "all": _combined(shift, contrast, brightness, blur, gaussian_noise),
}


def plant_copies(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every perturbation of `images` (float [N, R, R] in [0, 1]), clipped back to [0, 1]."""
    copies = {}
    for offset, (name, perturb) in enumerate(PERTURBATIONS.items()):
        rng = np.random.default_rng([seed, offset])
        copies[name] = np.clip(perturb(images.astype(np.float64), rng), 0.0, 1.0).astype(np.float32)
    return copies
