"""Patient-level bootstrap and the equivalence test (TOST) that restoration utility reports."""

from __future__ import annotations

import numpy as np
import pytest

from unpersonal.metrics.bootstrap import (equivalence, mean_interval, resample_weights,
                                          resampled_means)


def test_a_resample_draws_whole_patients() -> None:
    patients = np.array(["a", "a", "a", "b", "c", "c"])
    weights = resample_weights(patients, 300, seed=0)
    assert weights.shape == (300, 6)
    for row in weights:  # the images of one patient are drawn together
        assert row[0] == row[1] == row[2] and row[4] == row[5]
    # three patients drawn per resample, each bringing all of its images
    np.testing.assert_array_equal(weights[:, [0, 3, 4]].sum(axis=1), 3)
    np.testing.assert_array_equal(resample_weights(patients, 300, seed=0), weights)


def test_patients_with_many_alike_images_widen_the_interval() -> None:
    """Ten near-identical images per patient are one observation, not ten."""
    rng = np.random.default_rng(1)
    per_patient = rng.normal(0, 1, 40)
    values = np.repeat(per_patient, 10) + rng.normal(0, 0.01, 400)
    as_images = mean_interval(values, resample_weights(np.arange(400), 2000, seed=2))
    as_patients = mean_interval(values, resample_weights(np.arange(400) // 10, 2000, seed=2))
    width = {name: high - low for name, (low, high) in
             (("images", as_images["ci95"]), ("patients", as_patients["ci95"]))}
    assert width["patients"] > 2.5 * width["images"], width
    assert as_patients["mean"] == pytest.approx(values.mean())


@pytest.mark.parametrize("centre, spread, patients, expected", [
    (0.07, 0.3, 600, True),    # a tiny difference measured precisely: equivalent
    (1.0, 0.3, 600, False),    # a precise difference larger than the margin
    (0.0, 5.0, 10, False),     # no difference seen, but too noisy to call it equivalent
    (0.45, 0.05, 600, True),   # close to the margin and precise
    (0.45, 1.0, 600, False),   # close to the margin, interval crosses it
])
def test_equivalence_answers_whether_the_difference_is_small(centre: float, spread: float,
                                                             patients: int,
                                                             expected: bool) -> None:
    differences = np.random.default_rng(3).normal(centre, spread, patients)
    result = equivalence(differences, resample_weights(np.arange(patients), 2000, seed=4),
                         margin=0.5)
    assert result["equivalent"] is expected, result
    assert (result["p"] < 0.05) is expected  # the p-value and the interval agree
    assert result["interval_level"] == pytest.approx(0.9)


def test_at_the_margin_equivalence_is_claimed_at_most_alpha_of_the_time() -> None:
    """The test's level: when the true mean difference sits on the margin, 'equivalent' is
    wrong, and it is said in about 5% of measurements, not more."""
    rng = np.random.default_rng(5)
    claims = [equivalence(rng.normal(0.5, 1.0, 60), resample_weights(np.arange(60), 500, seed=t),
                          margin=0.5)["equivalent"] for t in range(300)]
    assert np.mean(claims) < 0.09, np.mean(claims)


def test_resampled_means_are_weighted_averages() -> None:
    values = np.array([1.0, 2.0, 4.0])
    weights = np.array([[1, 1, 1], [2, 0, 1], [0, 0, 3]])
    np.testing.assert_allclose(resampled_means(values, weights), [7 / 3, 2.0, 4.0])


def test_bad_margins_and_levels_are_refused() -> None:
    weights = resample_weights(np.arange(5), 10, seed=0)
    with pytest.raises(ValueError, match="margin"):
        equivalence(np.zeros(5), weights, margin=0.0)
    with pytest.raises(ValueError, match="alpha"):
        equivalence(np.zeros(5), weights, margin=0.1, alpha=0.5)
