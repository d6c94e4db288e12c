import numpy as np
import pytest

from unpersonal.evaluation.fidelity import frechet_distance


def test_fd_matches_the_closed_form_for_diagonal_gaussians() -> None:
    """For diagonal covariances FD = |mu1-mu2|^2 + sum (s1 - s2)^2 (s = standard deviations)."""
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a = mu1 + s1 * rng.standard_normal((200_000, 3))
    b = mu2 + s2 * rng.standard_normal((200_000, 3))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_fd_is_zero_for_the_same_set_and_symmetric_for_correlated_ones() -> None:
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((4, 4))
    a = rng.standard_normal((5000, 4)) @ mixing
    b = rng.standard_normal((5000, 4)) @ (mixing * 1.3) + 0.2
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 0.1


def test_fd_refuses_mismatched_features() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
