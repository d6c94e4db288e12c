"""Fidelity of a synthetic set in a feature space: the Fréchet distance.

Written here rather than imported: torch-fidelity and clean-fid need torchvision, which this
project cannot load, and SciPy's sqrtm is not a dependency. The symmetric form below needs only
an eigendecomposition, and is exact for the covariance matrices FD is defined on.
"""

from __future__ import annotations

import numpy as np


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets [N, D]:

        |mu_r - mu_s|^2 + tr(S_r + S_s - 2 (S_r^1/2 S_s S_r^1/2)^1/2)

    using the symmetric product, whose square root is real, instead of sqrtm(S_r S_s).
    """
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {real.shape} and "
                         f"{synthetic.shape}")
    if min(len(real), len(synthetic)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    real, synthetic = real.astype(np.float64), synthetic.astype(np.float64)
    mean_gap = real.mean(axis=0) - synthetic.mean(axis=0)
    cov_real, cov_synthetic = np.cov(real, rowvar=False), np.cov(synthetic, rowvar=False)
    root_real = _psd_sqrt(cov_real)
    cross = _psd_sqrt(root_real @ cov_synthetic @ root_real)
    distance = mean_gap @ mean_gap + np.trace(cov_real) + np.trace(cov_synthetic) - 2 * np.trace(cross)
    return float(max(distance, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (round-off negatives clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
