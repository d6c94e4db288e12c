"""A fixed, cheap image feature: PCA of the training pixels, unit-normed.

It stands in for the self-supervised embedder until one is trained: pseudo-conditioning only
needs a feature that places similar images near each other, and the Fréchet distance needs any
fixed feature space. PCA is deterministic, fits in a second, and needs no weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PixelPCA:
    dim: int = 32
    downsample: int = 2  # average-pool first: the coarse anatomy, not the noise, should lead
    mean_: np.ndarray | None = None
    components_: np.ndarray | None = None

    def fit(self, images: np.ndarray) -> PixelPCA:
        """images: float [N, H, W]; the top `dim` principal directions of the pooled pixels."""
        flat = self._flatten(images)
        self.mean_ = flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat - self.mean_, full_matrices=False)
        self.components_ = _fix_signs(vt[: self.dim]).astype(np.float32)
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm features [N, dim]."""
        if self.components_ is None or self.mean_ is None:
            raise RuntimeError("PixelPCA.transform before fit")
        projected = (self._flatten(images) - self.mean_) @ self.components_.T
        return (projected / np.linalg.norm(projected, axis=1, keepdims=True).clip(1e-8)).astype(
            np.float32)

    def _flatten(self, images: np.ndarray) -> np.ndarray:
        n, h, w = images.shape
        f = self.downsample
        pooled = images[:, : h - h % f, : w - w % f].reshape(n, h // f, f, w // f, f).mean((2, 4))
        return pooled.reshape(n, -1).astype(np.float64)


def _fix_signs(vt: np.ndarray) -> np.ndarray:
    """SVD signs are arbitrary; make each component's largest entry positive for reproducibility."""
    flip = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    return vt * flip[:, None]
