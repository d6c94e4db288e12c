"""Fidelity and diversity of a synthetic set in a feature space: FD, KID, PRDC, Vendi, retrieval.

Written here rather than imported: torch-fidelity and clean-fid need torchvision, which this
project cannot load. The Fréchet distance below needs only an eigendecomposition of symmetric
matrices, and is exact for the covariance matrices FD is defined on (SciPy's sqrtm of the
non-symmetric product can return complex round-off). The rest are short enough to own: KID as in
Bińkowski et al. 2018, precision/recall/density/coverage as in Naeem et al. 2020 (checked against
the `prdc` package in the tests), the Vendi score of Friedman & Dieng 2023, and a nearest-neighbour
retrieval score on FAISS, which the privacy filter already uses.

All functions take feature arrays [N, D] (any float dtype; computed in float64, FAISS in float32).
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np
from sklearn.metrics import pairwise_distances

PAIRWISE_CHUNK = 2048  # rows of a distance matrix held at a time (2048 x 100k float64 = 1.6 GB)


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets [N, D]:

        |mu_r - mu_s|^2 + tr(S_r + S_s - 2 (S_r^1/2 S_s S_r^1/2)^1/2)

    using the symmetric product, whose square root is real, instead of sqrtm(S_r S_s).
    """
    _check_pair(real, synthetic)
    if min(len(real), len(synthetic)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    real, synthetic = real.astype(np.float64), synthetic.astype(np.float64)
    mean_gap = real.mean(axis=0) - synthetic.mean(axis=0)
    cov_real, cov_synthetic = np.cov(real, rowvar=False), np.cov(synthetic, rowvar=False)
    root_real = _psd_sqrt(cov_real)
    cross = _psd_sqrt(root_real @ cov_synthetic @ root_real)
    distance = mean_gap @ mean_gap + np.trace(cov_real) + np.trace(cov_synthetic) - 2 * np.trace(cross)
    return float(max(distance, 0.0))


def kernel_inception_distance(real: np.ndarray, synthetic: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std) over random subsets of the unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3.

    Unlike FD it has an unbiased estimator, so values from sets of different sizes compare, and a
    set against a fresh sample of its own distribution scores ~0 (it can dip below 0). Subsets of
    min(subset_size, len(real), len(synthetic)) rows are drawn without replacement, seeded.
    """
    _check_pair(real, synthetic)
    if subsets < 1:
        raise ValueError(f"subsets must be positive, got {subsets}")
    m = min(subset_size, len(real), len(synthetic))
    if m < 2:
        raise ValueError("KID needs subsets of at least 2 samples per set")
    real, synthetic = real.astype(np.float64), synthetic.astype(np.float64)
    dim = real.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = synthetic[rng.choice(len(synthetic), m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        # Unbiased: the within-set means leave out the diagonal k(x_i, x_i).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2 * k_xy.mean()
    return float(values.mean()), float(values.std())


def prdc(real: np.ndarray, synthetic: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020), as the `prdc` package computes.

    Each real sample gets a ball reaching its k-th nearest other real sample (likewise synthetic
    samples, for recall). Precision: share of synthetic samples inside some real ball; recall:
    share of real samples inside some synthetic ball; density: real balls containing a synthetic
    sample, per sample, divided by k (~1 when the sets match, above 1 where synthetic samples
    crowd into dense regions); coverage: share of real balls holding a synthetic sample. Density
    and coverage replace precision and recall's outlier-prone union of balls with counts.
    Distances are Euclidean and held PAIRWISE_CHUNK rows at a time, never N x M at once.
    """
    _check_pair(real, synthetic)
    if k < 1 or k >= min(len(real), len(synthetic)):
        raise ValueError(f"k must be in [1, min set size - 1], got {k} for sets of "
                         f"{len(real)} and {len(synthetic)}")
    real, synthetic = real.astype(np.float64), synthetic.astype(np.float64)
    radius_real = _kth_neighbour_distance(real, k)
    radius_synthetic = _kth_neighbour_distance(synthetic, k)

    in_real_balls = np.empty(len(synthetic), dtype=np.int64)  # real balls holding each synthetic
    real_in_synthetic_ball = np.zeros(len(real), dtype=bool)
    nearest_synthetic = np.full(len(real), np.inf)
    for start in range(0, len(synthetic), PAIRWISE_CHUNK):
        stop = start + PAIRWISE_CHUNK
        dist = pairwise_distances(synthetic[start:stop], real)  # [chunk, N_real]
        in_real_balls[start:stop] = (dist < radius_real).sum(axis=1)
        real_in_synthetic_ball |= (dist < radius_synthetic[start:stop, None]).any(axis=0)
        np.minimum(nearest_synthetic, dist.min(axis=0), out=nearest_synthetic)
    return {
        "precision": float((in_real_balls > 0).mean()),
        "recall": float(real_in_synthetic_ball.mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float((nearest_synthetic < radius_real).mean()),
    }


def vendi_score(features: np.ndarray, normalize: bool = True) -> float:
    """Vendi score (Friedman & Dieng 2023): exp of the Shannon entropy of the eigenvalues of K / N,
    K the cosine-similarity Gram matrix. It reads as an effective number of distinct samples:
    1 for N copies of one vector, N for N mutually orthogonal ones.

    normalize=False trusts the rows to be unit-norm already (otherwise the eigenvalues do not sum
    to 1 and the score means nothing).
    """
    if features.ndim != 2 or len(features) < 1:
        raise ValueError(f"features must be [N, D] with N >= 1, got {features.shape}")
    x = features.astype(np.float64)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError("a zero feature vector has no direction: cosine similarity undefined")
        x = x / norms
    n, dim = x.shape
    # K / N = X X^T / N and X^T X / N share their nonzero eigenvalues (X = U S V^T gives both as
    # S^2 / N), so the D x D side is exact and costs O(N D^2 + D^3) instead of O(N^2 D + N^3):
    # for 50k samples of 512-d features, a 512 x 512 instead of a 50k x 50k eigenproblem.
    gram = x.T @ x / n if dim < n else x @ x.T / n
    eigenvalues = np.linalg.eigvalsh(gram)
    p = eigenvalues[eigenvalues > 0]  # round-off negatives and zeros add nothing (0 log 0 = 0)
    return float(np.exp(-np.sum(p * np.log(p))))


def retrieval_score(train: np.ndarray, synthetic: np.ndarray,
                    metric: Literal["cosine", "l2"] = "cosine") -> float:
    """Share of training samples that are the nearest training neighbour of some synthetic sample.

    How much of the training set the synthetic set points at: low when generation collapses onto a
    few training images, whether by mode collapse or memorisation. Its yardstick is the same score
    with a real held-out set (of the same size) in place of `synthetic`. Exact search (flat FAISS
    index): inner product of unit vectors for cosine, squared distance for l2.
    """
    _check_pair(train, synthetic)
    if len(train) < 1 or len(synthetic) < 1:
        raise ValueError("retrieval_score needs non-empty sets")
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    train32 = np.array(train, dtype=np.float32, order="C")  # copies: normalize_L2 works in place
    queries = np.array(synthetic, dtype=np.float32, order="C")
    if metric == "cosine":
        faiss.normalize_L2(train32)
        faiss.normalize_L2(queries)
        index: faiss.Index = faiss.IndexFlatIP(train32.shape[1])
    else:
        index = faiss.IndexFlatL2(train32.shape[1])
    index.add(train32)
    _, nearest = index.search(queries, 1)
    return float(len(np.unique(nearest[:, 0])) / len(train))


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {a.shape} and {b.shape}")


def _kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row: the (k+1)-th smallest including the
    row itself at 0, which is how the `prdc` package excludes self (a duplicate counts as 0)."""
    radii = np.empty(len(x))
    for start in range(0, len(x), PAIRWISE_CHUNK):
        dist = pairwise_distances(x[start:start + PAIRWISE_CHUNK], x)
        radii[start:start + PAIRWISE_CHUNK] = np.partition(dist, k, axis=1)[:, k]
    return radii


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (round-off negatives clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
