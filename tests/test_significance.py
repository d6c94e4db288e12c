"""The audit's tests: exact under the null (an honest release fails at most alpha of the time),
and failing when a share of the release leaks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from unpersonal.privacy.significance import (auc_test, exceedance_test, holm,
                                             order_statistic_rank)


def test_exceedance_known_answer() -> None:
    """One held-out value: the chance a new value lies beyond it is uniform on [0, 1], so the
    count of N new values beyond it is uniform on 0..N."""
    result = exceedance_test(np.array([0.1, 0.2, 0.9]), np.array([0.5]), 0.0, "below")
    assert result["rank"] == 1 and result["cutoff"] == 0.5 and result["count"] == 2
    assert result["p_value"] == pytest.approx(2 / 4)  # P(count >= 2), count uniform on 0..3
    above = exceedance_test(np.array([0.1, 0.2, 0.9]), np.array([0.5]), 0.0, "above")
    assert above["count"] == 1 and above["p_value"] == pytest.approx(3 / 4)


def test_order_statistic_rank() -> None:
    assert order_statistic_rank(624, 0.01) == 6  # 6 / 625 = 0.0096
    assert order_statistic_rank(624, 0.0) == 1  # the closest held-out image
    assert order_statistic_rank(10, 0.5) == 6
    with pytest.raises(ValueError, match="at least one"):
        order_statistic_rank(0, 0.01)


@pytest.mark.parametrize("share", [0.0, 0.01, 0.02])
def test_exceedance_false_alarm_rate_is_at_most_alpha(share: float) -> None:
    """2,000 honest releases (released and held-out values from one distribution): the test
    rejects at most 5% of them (within the binomial spread of 2,000 trials)."""
    rng = np.random.default_rng(1)
    rejected = [exceedance_test(rng.normal(size=400), rng.normal(size=300), share, "below")
                ["p_value"] <= 0.05 for _ in range(2000)]
    assert np.mean(rejected) <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / 2000)


def test_exceedance_fails_a_release_with_one_percent_copies() -> None:
    """1% of 4,000 released images at distance 0 (exact copies) against 600 held-out images:
    caught below the closest held-out image; without them the same release passes."""
    rng = np.random.default_rng(2)
    heldout = rng.gamma(4.0, size=600)
    honest = rng.gamma(4.0, size=4000)
    leaked = honest.copy()
    leaked[:40] = 0.0
    assert exceedance_test(honest, heldout, 0.0, "below")["p_value"] > 0.05
    assert exceedance_test(leaked, heldout, 0.0, "below")["p_value"] < 0.005


def test_auc_test_known_answer_and_separation() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    member = np.array([True, True, True, False, False, False])
    patient = np.arange(6)
    result = auc_test(scores, member, patient, permutations=999)
    assert result["auc"] == 1.0
    assert result["p_value"] == pytest.approx(1 / 20, abs=0.03)  # 1 of C(6,3) = 20 labellings
    assert result["ci"][0] <= 1.0 == result["ci"][1]


def test_auc_test_resamples_patients_not_images() -> None:
    """Patients of 10 near-identical images, membership by patient, scores unrelated to it:
    an image-level test (Mann-Whitney) rejects far more often than 5%; the patient-level one
    keeps to 5%."""
    rng = np.random.default_rng(3)
    patient = np.repeat(np.arange(40), 10)
    member = np.repeat(np.arange(40) < 20, 10)
    ours, image_level = [], []
    for _ in range(200):
        scores = np.repeat(rng.normal(size=40), 10) + 0.01 * rng.normal(size=400)
        ours.append(auc_test(scores, member, patient, permutations=199, rounds=1,
                             seed=int(rng.integers(1 << 30)))["p_value"] <= 0.05)
        image_level.append(stats.mannwhitneyu(scores[member], scores[~member],
                                              alternative="greater").pvalue <= 0.05)
    assert np.mean(image_level) > 0.2
    assert np.mean(ours) <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / 200)


def test_auc_test_refuses_a_patient_on_both_sides() -> None:
    with pytest.raises(ValueError, match="both member and non-member"):
        auc_test(np.arange(4.0), np.array([True, True, False, False]), np.array([0, 1, 1, 2]))


def test_holm_known_answer() -> None:
    result = holm({"a": 0.01, "b": 0.04, "c": 0.03}, alpha=0.05)
    assert result["a"]["p_adjusted"] == pytest.approx(0.03)
    assert result["c"]["p_adjusted"] == pytest.approx(0.06)  # 2 * 0.03
    assert result["b"]["p_adjusted"] == pytest.approx(0.06)  # max(1 * 0.04, the step before)
    assert [result[name]["rejected"] for name in "abc"] == [True, False, False]
    assert list(result) == ["a", "b", "c"]  # in the order given


def test_the_detectable_copy_share_is_where_the_closest_image_test_fails() -> None:
    """Kermany's 533 validation images, eight tests at 0.05: about 1% of copies; seven images:
    more than half. At that share, exact copies among many released images reach the Holm
    level, below it they do not."""
    from unpersonal.evaluation.audit import detectable_copy_share

    share = detectable_copy_share(533, 0.05, 8)
    assert 0.009 < share < 0.0100 and detectable_copy_share(7, 0.05, 8) > 0.5
    rng = np.random.default_rng(5)
    heldout = rng.uniform(0.5, 1.0, 533)
    # Honest values fall below the closest held-out one by chance (about 1 in 534); copies always.

    def p_value(copies: float) -> float:
        released = rng.uniform(0.5, 1.0, 100_000)
        released[:int(copies * len(released))] = 0.0
        return exceedance_test(released, heldout, 0.0, "below")["p_value"]
    assert p_value(share * 1.3) <= 0.05 / 8 < p_value(share * 0.7)
