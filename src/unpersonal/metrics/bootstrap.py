"""Patient-level bootstrap of a mean, and an equivalence test built on it.

Images of one patient are not independent, so every resample draws whole patients with
replacement. `resample_weights` gives, for each of B resamples, how many times each image is
drawn; a resampled mean is then one weighted average, which keeps thousands of resamples of a
few thousand images a single matrix product.

Equivalence is the question "is the difference small enough not to matter?", which a
significance test does not answer: with enough pixels any difference is significant, and a
non-significant one may just be a noisy measurement. The two one-sided tests (TOST; Schuirmann
1987) ask it directly: the mean difference is equivalent to zero within a margin declared before
the measurement when both "difference <= -margin" and "difference >= +margin" are rejected at
level alpha, that is when the (1 - 2 alpha) interval lies inside (-margin, +margin).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def resample_weights(groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[resamples, N] counts: how often each of the N rows is drawn when the groups (patients)
    are drawn with replacement, as many as there are."""
    if resamples < 1:
        raise ValueError(f"need resamples >= 1, got {resamples}")
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    patients = int(inverse.max()) + 1
    picks = np.random.default_rng(seed).integers(0, patients, (resamples, patients))
    times = np.zeros((resamples, patients))
    np.add.at(times, (np.arange(resamples)[:, None], picks), 1)
    return times[:, inverse]


def resampled_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean of `values` [N] in each resample of `weights` [B, N] -> [B]."""
    return weights @ np.asarray(values, np.float64) / weights.sum(axis=1)


def mean_interval(values: np.ndarray, weights: np.ndarray, level: float = 0.95
                  ) -> dict[str, Any]:
    """The mean and its percentile bootstrap interval."""
    tail = (1 - level) / 2
    low, high = np.quantile(resampled_means(values, weights), [tail, 1 - tail])
    return {"mean": float(np.mean(values)), "ci95": [float(low), float(high)]}


def equivalence(differences: np.ndarray, weights: np.ndarray, margin: float,
                alpha: float = 0.05) -> dict[str, Any]:
    """TOST of paired differences against +-`margin`, by the bootstrap of their mean.

    Each one-sided p-value is the share of resampled means on the null's side of its margin
    (with the usual +1 so that it is never 0); the test's p-value is the larger one. The verdict
    is that the (1 - 2 alpha) percentile interval lies inside the margin, which is the same
    decision up to the resolution of the resamples.
    """
    if margin <= 0 or not 0 < alpha < 0.5:
        raise ValueError(f"need margin > 0 and 0 < alpha < 0.5, got {margin}, {alpha}")
    means = resampled_means(differences, weights)
    count = len(means)
    p_below = (np.sum(means <= -margin) + 1) / (count + 1)
    p_above = (np.sum(means >= margin) + 1) / (count + 1)
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"margin": float(margin), "alpha": alpha,
            "interval": [float(low), float(high)], "interval_level": 1 - 2 * alpha,
            "p": float(max(p_below, p_above)),
            "equivalent": bool(-margin < low and high < margin)}
