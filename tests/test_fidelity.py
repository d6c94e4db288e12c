import numpy as np
import pytest

from unpersonal.evaluation import fidelity
from unpersonal.evaluation.fidelity import (
    frechet_distance,
    kernel_inception_distance,
    prdc,
    retrieval_score,
    vendi_score,
)


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


def test_fd_matches_scipy_sqrtm_on_correlated_features() -> None:
    """The textbook formula, |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's matrix
    square root, on features whose covariances are far from diagonal."""
    from scipy import linalg

    rng = np.random.default_rng(7)
    mixing = rng.standard_normal((6, 6))
    a = rng.standard_normal((3000, 6)) @ mixing
    b = rng.standard_normal((3000, 6)) @ (mixing + 0.5 * rng.standard_normal((6, 6))) + 0.3
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_fd_refuses_mismatched_features() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_kid_is_near_zero_for_one_distribution_and_large_for_shifted_sets() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 8))
    b = rng.standard_normal((400, 8))
    shifted = rng.standard_normal((400, 8)) + 1.0
    same_mean, same_std = kernel_inception_distance(a, a, subsets=20, subset_size=200)
    fresh_mean, _ = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    far_mean, far_std = kernel_inception_distance(a, shifted, subsets=20, subset_size=200)
    assert abs(same_mean) < 0.05 and abs(fresh_mean) < 0.05 and same_std >= 0
    assert far_mean > 1.0 and far_mean > 10 * max(abs(same_mean), abs(fresh_mean))
    assert far_std < far_mean  # every subset agrees the sets differ
    assert kernel_inception_distance(a, shifted, subsets=20, subset_size=200) == (far_mean, far_std)
    other_seed = kernel_inception_distance(a, shifted, subsets=20, subset_size=200, seed=1)
    assert other_seed[0] != far_mean


def test_kid_matches_the_unbiased_mmd_written_out_for_full_sets() -> None:
    """With subset_size >= both sets every subset is a permutation: one exact value, std 0."""
    rng = np.random.default_rng(3)
    m = 20
    x, y = rng.standard_normal((m, 4)), rng.standard_normal((m, 4)) + 0.5

    def kernel(u: np.ndarray, v: np.ndarray) -> float:
        return (u @ v / 4 + 1) ** 3

    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=1000)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_prdc_matches_the_prdc_package() -> None:
    from prdc import compute_prdc  # a test dependency (pyproject): never skipped

    rng = np.random.default_rng(4)
    real = rng.standard_normal((200, 16))
    fake = 0.8 * rng.standard_normal((150, 16)) + 0.3
    ours = prdc(real, fake, k=5)
    theirs = compute_prdc(real, fake, nearest_k=5)
    assert set(ours) == {"precision", "recall", "density", "coverage"}
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-6), name
    # Not a degenerate agreement: the four figures are informative (strictly between 0 and 1).
    assert all(0 < ours[name] < 1 for name in ("precision", "recall", "coverage"))


def test_prdc_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((90, 6)), rng.standard_normal((70, 6)) + 0.2
    whole = prdc(real, fake, k=3)
    monkeypatch.setattr(fidelity, "PAIRWISE_CHUNK", 16)
    assert prdc(real, fake, k=3) == whole


def test_prdc_of_a_set_with_itself_is_one() -> None:
    rng = np.random.default_rng(6)
    real = rng.standard_normal((300, 10))
    scores = prdc(real, real.copy(), k=5)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert scores["density"] == pytest.approx(1.0, abs=0.1)


def test_vendi_known_answers() -> None:
    rng = np.random.default_rng(7)
    one = rng.standard_normal(12)
    assert vendi_score(np.tile(one, (50, 1))) == pytest.approx(1.0, abs=1e-6)  # D < N path
    assert vendi_score(np.tile(one, (5, 1))) == pytest.approx(1.0, abs=1e-6)  # D >= N path
    basis = np.eye(16)[:10] * rng.uniform(0.5, 3.0, size=(10, 1))  # orthogonal, unequal norms
    assert vendi_score(basis) == pytest.approx(10.0, rel=1e-9)  # D >= N path
    assert vendi_score(np.eye(16) * 2.0) == pytest.approx(16.0, rel=1e-9)
    orthogonal = np.linalg.qr(rng.standard_normal((8, 8)))[0]  # rows orthonormal, dense
    assert vendi_score(np.vstack([orthogonal, orthogonal])) == pytest.approx(8.0, rel=1e-9)  # D < N


def test_vendi_paths_agree_and_normalisation_matters() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, 6)) + 1.0
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    gram_eigenvalues = np.linalg.eigvalsh(unit @ unit.T / len(unit))  # the N x N definition
    p = gram_eigenvalues[gram_eigenvalues > 1e-15]
    expected = np.exp(-np.sum(p * np.log(p)))
    assert vendi_score(x) == pytest.approx(expected, rel=1e-9)
    assert vendi_score(unit, normalize=False) == pytest.approx(expected, rel=1e-9)
    assert 1.0 < expected < 6.0
    with pytest.raises(ValueError):
        vendi_score(np.zeros((3, 4)))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_retrieval_score_counts_the_training_samples_pointed_at(metric: str) -> None:
    rng = np.random.default_rng(9)
    train = rng.standard_normal((100, 16)).astype(np.float32)
    assert retrieval_score(train, train[:10].copy(), metric=metric) == pytest.approx(0.10)
    repeated = np.repeat(train[:10], 5, axis=0)
    assert retrieval_score(train, repeated, metric=metric) == pytest.approx(0.10)
    assert retrieval_score(train, train[::-1].copy(), metric=metric) == pytest.approx(1.0)
    near = train[:30] + 0.01 * rng.standard_normal((30, 16)).astype(np.float32)
    assert retrieval_score(train, near, metric=metric) == pytest.approx(0.30)


def test_retrieval_score_cosine_ignores_scale_and_l2_does_not() -> None:
    train = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.1]])
    synthetic = np.array([[3.0, 0.0], [1.0, 0.0]])
    assert retrieval_score(train, synthetic, metric="cosine") == pytest.approx(1 / 3)  # both -> 0
    assert retrieval_score(train, synthetic, metric="l2") == pytest.approx(2 / 3)  # -> 2 and 0


def test_retrieval_score_refuses_an_unknown_metric() -> None:
    with pytest.raises(ValueError):
        retrieval_score(np.ones((3, 2)), np.ones((2, 2)),
                        metric="manhattan")  # type: ignore[arg-type]
