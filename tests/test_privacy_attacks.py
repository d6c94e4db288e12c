"""The audit's attacks on embeddings with known answers: honest sets pass, copies are caught."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from unpersonal.artifacts.reid import ReidScorer, cosine_to_score
from unpersonal.privacy.attacks import (dcr_summary, distance_to_closest_record,
                                        membership_inference, reid_rate, singling_out)

DIM = 16
# Same-patient cosines come out ~0.85-0.95 (scores > 0.9), different patients' ~0 +- 0.25
# (scores < 0.01 but for a few close pairs): the re-ID threshold 0.5 sits at cosine 0.75.
SCORER = ReidScorer(scale=20.0, bias=-15.0, threshold=0.5)
THRESHOLDS = [0.01, 0.05, 0.2, 0.5, 0.9]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def patients(rng: np.random.Generator, count: int, prefix: str, per: int = 3,
             noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """`per` images of each of `count` patients: unit(patient centre + noise of norm ~`noise`)."""
    centres = unit(rng.normal(size=(count, DIM)))
    images = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(count * per, DIM)) / 4
    return unit(images), np.repeat([f"{prefix}{i:03d}" for i in range(count)], per)


def copies_of(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a memorising generator returns: the training embeddings, barely perturbed."""
    return unit(images + 0.01 * rng.normal(size=images.shape) / 4)


@pytest.fixture(scope="module")
def world() -> SimpleNamespace:
    """Training and held-out patients, and synthetic images of patients nobody has seen."""
    rng = np.random.default_rng(7)
    train, train_patient = patients(rng, 200, "T")
    heldout, heldout_patient = patients(rng, 200, "H")
    fresh, _ = patients(rng, 200, "F")
    return SimpleNamespace(train=train, train_patient=train_patient, heldout=heldout,
                           heldout_patient=heldout_patient, fresh=fresh,
                           copies=copies_of(train, rng))


# ---- the scorer ----

def test_scorer_is_the_one_score_function_of_the_cosine() -> None:
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=(5, DIM))), unit(rng.normal(size=(7, DIM)))
    cosine = a @ b.T
    np.testing.assert_array_equal(SCORER.score_matrix(a, b), cosine_to_score(cosine, 20.0, -15.0))
    np.testing.assert_array_equal(SCORER.score(cosine), cosine_to_score(cosine, 20.0, -15.0))
    sigmoid = 1 / (1 + np.exp(-(20.0 * cosine - 15.0)))
    np.testing.assert_allclose(SCORER.score(cosine), sigmoid, rtol=1e-12)
    steep = ReidScorer(1e4, -9990.0, 0.5)  # logits of +-1e4 stay finite and ordered in float64
    scores = steep.score(np.array([-1.0, 0.999, 1.0]))
    assert np.isfinite(scores).all() and scores[0] == 0.0 and scores[1] < scores[2] <= 1.0


# ---- re-identification and distances, by hand ----

def test_reid_rate_known_answer() -> None:
    scorer = ReidScorer(scale=10.0, bias=-9.0, threshold=0.5)  # linked from cosine 0.9
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    queries = unit(np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.2], [0.1, 1.0]]))
    result = reid_rate(queries, train, scorer, k=2)
    best_cosine = np.array([1.0, np.sqrt(0.5), 0.2 / np.hypot(1, 0.2), 1 / np.hypot(0.1, 1)])
    np.testing.assert_allclose(result["max_score"], 1 / (1 + np.exp(-(10 * best_cosine - 9))))
    np.testing.assert_array_equal(result["linked"], [True, False, False, True])
    assert result["rate"] == 0.5 and result["threshold"] == 0.5


def test_distance_to_closest_record_known_answer() -> None:
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    queries = unit(np.array([[1.0, 1.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(distance_to_closest_record(queries, train, "cosine"),
                               [1 - np.sqrt(0.5), 1.0], atol=1e-6)
    np.testing.assert_allclose(distance_to_closest_record(queries, train, "l2"),
                               [np.sqrt(2 - np.sqrt(2)), np.sqrt(2)], atol=1e-6)


def test_dcr_summary_known_answer() -> None:
    # 199 held-out distances 0.005, 0.010, ..., 0.995: the 1st percentile is the 2nd closest
    # (2 / 200 = 0.01 of new images fall below it), 0.010.
    heldout = np.arange(1, 200) / 200
    summary = dcr_summary(np.array([0.0, 0.005, 0.5, 0.9]), heldout)
    assert summary["heldout_q01"] == pytest.approx(0.010)
    assert summary["synthetic_share_below"] == 0.5
    assert summary["heldout_share_below"] == 0.01
    assert summary["synthetic"]["median"] == pytest.approx(0.2525)
    assert summary["heldout"]["median"] == pytest.approx(0.5)
    on_the_cutoff = dcr_summary(np.array([0.010, 0.0099]), heldout)
    assert on_the_cutoff["synthetic_share_below"] == 0.5  # "closer than", not "as close as"


def test_membership_of_exact_copies_is_certain() -> None:
    rng = np.random.default_rng(1)
    members, nonmembers = unit(rng.normal(size=(30, DIM))), unit(rng.normal(size=(60, DIM)))
    result = membership_inference(members, nonmembers, synthetic=members.copy(), k=1)
    assert result["distance"]["auc"] == 1.0 and result["density_ratio"]["auc"] == 1.0
    assert result["distance"]["tpr_at_fpr"] == 1.0
    assert result["n_members"] == result["n_nonmembers"] == 30  # half the 60 are the reference


def test_singling_out_counts_patients_not_images() -> None:
    """By hand in 2D: a predicate isolates when exactly one training PATIENT has a matching
    image; released and held-out images' predicates are counted on the same population."""
    scorer = ReidScorer(scale=10.0, bias=-6.0, threshold=0.5)
    at = lambda *degrees: np.array([[np.cos(np.radians(d)), np.sin(np.radians(d))]  # noqa: E731
                                    for d in degrees])
    train, train_patient = at(0, 90, 10), np.array(["a", "b", "a"])  # a's two images apart
    # Released: 0 deg matches a only (both images: still one patient); 45 matches a and b at
    # 0.5 and nobody at 0.9; 180 nobody; 20 a only. At 0.99 nobody reaches a score (the best is
    # sigmoid(4) = 0.982).
    synthetic = at(0, 45, 180, 20)
    # Held-out: 180 and 270 match nobody; 100 matches b alone; 60 matches a and b at 0.5, b
    # alone at 0.9.
    heldout = at(180, 270, 100, 60)
    result = singling_out(synthetic, train, train_patient, heldout, scorer, [0.9, 0.5, 0.99],
                          repeats=5)
    np.testing.assert_array_equal(result["thresholds"], [0.5, 0.9, 0.99])
    np.testing.assert_allclose(result["train_rate"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(result["heldout_rate"], [0.25, 0.5, 0.0])
    np.testing.assert_allclose(result["excess"], [0.25, 0.0, 0.0])
    assert result["max_excess"] == 0.25 and result["max_threshold"] == 0.5
    assert result["population_size"] == 2  # the whole training population, a and b
    # The held-out predicates' weight: patients matched per predicate, over the 2 patients.
    np.testing.assert_allclose(result["weight"], [(0 + 0 + 1 + 2) / 4 / 2, (1 + 1) / 4 / 2, 0])


def test_a_release_farther_from_everyone_singles_out_nobody() -> None:
    """New patients' images moved away from every training patient alike (a generator a little
    off the data: every cosine shrunk, by an extra dimension only the release uses). Their
    predicates match fewer patients at every threshold; where held-out ones match several, they
    isolate someone far more often than held-out images' do, without knowing anyone. Those
    thresholds are not singling out (weight above 1/n) and are left out; copies mixed into the
    same release are still caught."""
    rng = np.random.default_rng(21)
    train, train_patient = patients(rng, 150, "T")
    heldout, heldout_patient = patients(rng, 80, "H")
    fresh, _ = patients(rng, 300, "F", per=1)
    apart = lambda x, a: np.c_[np.sqrt(1 - a * a) * x, np.full(len(x), a)]  # noqa: E731
    train, heldout, farther = apart(train, 0), apart(heldout, 0), apart(fresh, 0.4)
    everywhere = [0.003, 0.01, *THRESHOLDS]
    matched = [(SCORER.score_matrix(rows, train)[:, :, None] >= everywhere)
               .reshape(len(rows), 150, 3, -1).any(axis=2).sum(axis=1)
               for rows in (farther, heldout)]
    isolating = [(m == 1).mean(axis=0) for m in matched]
    assert isolating[0][1] > isolating[1][1] + 0.1, isolating  # at 0.01 (4 patients matched)
    shifted = singling_out(farther, train, train_patient, heldout, SCORER, everywhere,
                           heldout_patient=heldout_patient, repeats=399)
    assert 0.01 in shifted["high_weight_thresholds"] and 0.01 not in shifted["thresholds"]
    assert shifted["p_value"] > 0.05, shifted
    copied = np.concatenate([farther[:285], copies_of(train[rng.choice(len(train), 15)], rng)])
    leaked = singling_out(copied, train, train_patient, heldout, SCORER, everywhere,
                          heldout_patient=heldout_patient, repeats=399)
    assert leaked["p_value"] < 0.05 and leaked["max_excess"] > 0.03, leaked


# ---- an honest synthetic set: images of new patients ----

def test_honest_set_reid_rate_is_the_heldout_rate(world: SimpleNamespace) -> None:
    synthetic = reid_rate(world.fresh, world.train, SCORER)
    reference = reid_rate(world.heldout, world.train, SCORER)
    assert 0 < reference["rate"] < 0.2  # some new patients do look like a training patient
    # A patient's images are linked or not together: ~0.03 standard error on the difference.
    assert abs(synthetic["rate"] - reference["rate"]) < 0.1


def test_honest_set_is_not_closer_than_heldout_images(world: SimpleNamespace) -> None:
    summary = dcr_summary(distance_to_closest_record(world.fresh, world.train),
                          distance_to_closest_record(world.heldout, world.train))
    assert summary["synthetic_share_below"] < 0.05
    assert 0 < summary["heldout_share_below"] <= 0.01 + 1 / len(world.heldout)
    assert summary["synthetic"]["median"] == pytest.approx(summary["heldout"]["median"], rel=0.2)


def test_honest_set_does_not_reveal_membership(world: SimpleNamespace) -> None:
    result = membership_inference(world.train, world.heldout, world.fresh,
                                  heldout_patient=world.heldout_patient, seed=3,
                                  member_patient=world.train_patient)
    assert result["reference"] == "held-out half (by patient)"
    assert result["n_members"] == result["n_nonmembers"] == 300  # 100 of 200 held-out patients
    assert result["n_reference"] == 300
    for attack in ("distance", "density_ratio"):
        # The verdict is the test: no evidence of membership at 0.05, and 0.5 in the interval.
        assert result[attack]["p_value"] > 0.05, (attack, result[attack])
        low, high = result[attack]["auc_ci"]
        assert low < 0.5 < high, result[attack]


def test_non_members_of_another_kind_read_as_membership() -> None:
    """Why the audit draws its non-members from the validation split: held-out images unlike the
    training images (a test set collected apart) make an honest set look as if it revealed
    membership to the density attack, which then measures the difference in kind."""
    rng = np.random.default_rng(11)
    train, _ = patients(rng, 200, "T")
    fresh, _ = patients(rng, 200, "F")
    alike, alike_patient = patients(rng, 200, "A")
    unlike = unit(alike + 0.5 * unit(rng.normal(size=(1, DIM))))  # one shift for all of them
    honest = membership_inference(train, alike, fresh, heldout_patient=alike_patient, seed=3)
    confounded = membership_inference(train, unlike, fresh, heldout_patient=alike_patient,
                                      seed=3)
    assert abs(honest["density_ratio"]["auc"] - 0.5) < 0.1, honest
    assert confounded["density_ratio"]["auc"] > 0.7, confounded


def test_honest_set_singles_out_nobody(world: SimpleNamespace) -> None:
    result = singling_out(world.fresh, world.train, world.train_patient, world.heldout, SCORER,
                          THRESHOLDS, heldout_patient=world.heldout_patient, repeats=199)
    assert result["heldout_rate"].max() > 0.2  # predicates do isolate people by chance ...
    assert not result["significant"]  # ... no more often from the set than from new patients
    low, high = result["max_ci"]
    assert low <= 0 <= high and abs(result["max_excess"]) < 0.1


# ---- a memorising synthetic set: copies of training images ----

def test_copies_are_reidentified_and_too_close(world: SimpleNamespace) -> None:
    assert reid_rate(world.copies, world.train, SCORER)["rate"] == 1.0
    summary = dcr_summary(distance_to_closest_record(world.copies, world.train),
                          distance_to_closest_record(world.heldout, world.train))
    assert summary["synthetic_share_below"] > 0.95


def test_copies_reveal_membership(world: SimpleNamespace) -> None:
    result = membership_inference(world.train, world.heldout, world.copies,
                                  heldout_patient=world.heldout_patient,
                                  member_patient=world.train_patient)
    assert result["distance"]["auc"] > 0.95 and result["distance"]["tpr_at_fpr"] > 0.9
    assert result["density_ratio"]["auc"] > 0.9
    for attack in ("distance", "density_ratio"):
        assert result[attack]["p_value"] == pytest.approx(1 / 1000)  # no relabelling came near
        assert result[attack]["auc_ci"][0] > 0.85


def test_copies_of_some_images_reveal_membership_of_those(world: SimpleNamespace) -> None:
    """A third of the synthetic set copied, the rest honest: the AUC moves up, not to 1."""
    rng = np.random.default_rng(5)
    copied = rng.choice(len(world.train), 200, replace=False)
    synthetic = np.concatenate([world.copies[copied], world.fresh[:400]])
    result = membership_inference(world.train, world.heldout, synthetic,
                                  heldout_patient=world.heldout_patient)
    for attack in ("distance", "density_ratio"):
        assert 0.6 < result[attack]["auc"] < 0.95, (attack, result[attack])


def test_copies_single_out_training_patients(world: SimpleNamespace) -> None:
    result = singling_out(world.copies, world.train, world.train_patient, world.heldout, SCORER,
                          THRESHOLDS, heldout_patient=world.heldout_patient, repeats=199)
    assert result["significant"] and result["max_ci"][0] > 0.5
    assert result["max_excess"] > 0.8 and result["max_threshold"] >= 0.5
    assert result["p_value"] == pytest.approx(1 / 200)  # no permutation came near


def test_a_few_copies_among_honest_images_single_out_the_whole_population() -> None:
    """5% of the set copied from 5% of 400 training patients: significant, since every
    training patient counts (no subsample of the population dilutes the copies)."""
    rng = np.random.default_rng(12)
    train, train_patient = patients(rng, 400, "T")
    heldout, heldout_patient = patients(rng, 100, "H")
    fresh, _ = patients(rng, 380, "F", per=1)
    copied = rng.choice(len(train), 20, replace=False)
    synthetic = np.concatenate([fresh, copies_of(train[copied], rng)])
    result = singling_out(synthetic, train, train_patient, heldout, SCORER, THRESHOLDS,
                          heldout_patient=heldout_patient, repeats=999)
    assert result["p_value"] < 0.01 and result["max_excess"] > 0.04, result
    honest = singling_out(fresh, train, train_patient, heldout, SCORER, THRESHOLDS,
                          heldout_patient=heldout_patient, repeats=999)
    assert honest["p_value"] > 0.05


# ---- the baseline itself ----

def test_two_samples_of_one_population_show_no_excess() -> None:
    """Released and held-out images both of new patients, released with wider spread so that
    many predicates isolate someone: whatever the threshold, the interval contains 0."""
    rng = np.random.default_rng(11)
    train, train_patient = patients(rng, 90, "A")
    heldout, heldout_patient = patients(rng, 60, "B")
    synthetic, _ = patients(rng, 180, "C", per=1, noise=0.5)
    result = singling_out(synthetic, train, train_patient, heldout, SCORER, THRESHOLDS,
                          heldout_patient=heldout_patient, repeats=400, seed=2)
    assert result["population_size"] == 90 and result["repeats"] == 400
    assert result["train_rate"].max() > 0.2 and result["heldout_rate"].max() > 0.2
    assert (result["excess_ci"][:, 0] <= 0).all() and (result["excess_ci"][:, 1] >= 0).all()
    assert not result["significant"] and result["p_value"] > 0.05


def test_singling_out_false_alarms_at_most_alpha() -> None:
    """60 honest releases (new patients' images) against one training population: the
    permutation p-value falls below 0.05 in at most 5% of them, up to binomial spread."""
    rng = np.random.default_rng(13)
    train, train_patient = patients(rng, 60, "T")
    alarms = []
    for draw in range(60):
        synthetic, _ = patients(rng, 90, f"S{draw}-", per=1)  # drawn apart, one by one
        heldout, heldout_patient = patients(rng, 30, f"H{draw}-")
        alarms.append(singling_out(synthetic, train, train_patient, heldout, SCORER, THRESHOLDS,
                                   heldout_patient=heldout_patient, repeats=99,
                                   seed=draw)["p_value"] <= 0.05)
    assert np.mean(alarms) <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / 60)


def test_results_repeat_with_the_seed_and_vary_without(world: SimpleNamespace) -> None:
    args = (world.fresh, world.train, world.train_patient, world.heldout, SCORER, THRESHOLDS,
            world.heldout_patient)
    first, again = singling_out(*args, seed=4), singling_out(*args, seed=4)
    other = singling_out(*args, seed=5)
    np.testing.assert_array_equal(first["excess"], again["excess"])
    np.testing.assert_array_equal(first["excess_ci"], again["excess_ci"])
    np.testing.assert_array_equal(first["excess"], other["excess"])  # no subsample: same rates
    assert not np.array_equal(first["excess_ci"], other["excess_ci"])  # other permutations


# ---- bad inputs ----

def test_bad_inputs_are_refused(world: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="unit-norm"):
        reid_rate(world.fresh * 2, world.train, SCORER)
    with pytest.raises(ValueError, match="one id per image"):
        singling_out(world.fresh, world.train, world.train_patient[:-1], world.heldout, SCORER,
                     THRESHOLDS)
    with pytest.raises(ValueError, match="thresholds"):
        singling_out(world.fresh, world.train, world.train_patient, world.heldout, SCORER,
                     [0.5, 1.0])
    with pytest.raises(ValueError, match="dimensions"):
        distance_to_closest_record(world.fresh[:, :8], world.train)
    with pytest.raises(ValueError, match="at least k"):
        membership_inference(world.train, world.heldout, world.fresh[:3], k=5)
