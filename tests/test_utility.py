"""Seed-averaged ROC-AUC intervals and the paired gap interval (metrics/auc.py)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from unpersonal.metrics.auc import (
    bootstrap_auc_ci, bootstrap_auc_gap_ci, rank_auc, roc_auc_per_class)


def _scores(seed: int, signal: float, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, 1))
    probs = 1 / (1 + np.exp(-(signal * (labels - 0.5) + rng.normal(0, 1, (n, 1)))))
    return labels, probs


def test_auc_agrees_with_scikit_learn() -> None:
    labels, probs = _scores(0, 1.5)
    ours = roc_auc_per_class(labels, probs, "binary", ["finding"])["mean"]
    assert ours == roc_auc_score(labels[:, 0], probs[:, 0])


def test_the_bootstraps_rank_auc_is_scikit_learn_s_with_ties() -> None:
    rng = np.random.default_rng(5)
    for size, levels in ((7, 3), (275, 20), (1000, 1000)):
        truth = np.r_[0, 1, rng.integers(0, 2, size - 2)]
        scores = rng.integers(0, levels, size) / levels  # ties when levels < size
        assert np.isclose(rank_auc(truth, scores), roc_auc_score(truth, scores), atol=1e-12)
    assert rank_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9])) == 0.875


def test_a_stack_of_one_classifier_repeated_gives_that_classifier_s_interval() -> None:
    labels, probs = _scores(1, 1.5)
    groups = np.arange(len(labels)) // 3
    single = bootstrap_auc_ci(labels, probs, "binary", 200, seed=3, groups=groups)
    stacked = bootstrap_auc_ci(labels, np.stack([probs, probs, probs]), "binary", 200, seed=3,
                               groups=groups)
    assert np.allclose(stacked, single, rtol=1e-12, atol=0)


def test_gap_interval_is_zero_for_the_same_classifier_and_signed_for_a_better_one() -> None:
    labels, weak = _scores(2, 0.5)
    rng = np.random.default_rng(4)
    strong = 1 / (1 + np.exp(-(4.0 * (labels - 0.5) + rng.normal(0, 1, labels.shape))))
    assert bootstrap_auc_gap_ci(labels, weak, weak, "binary", 100, seed=0) == (0.0, 0.0)
    low, high = bootstrap_auc_gap_ci(labels, strong, weak, "binary", 300, seed=0)
    gap = roc_auc_score(labels[:, 0], strong[:, 0]) - roc_auc_score(labels[:, 0], weak[:, 0])
    assert 0 < low <= gap <= high
