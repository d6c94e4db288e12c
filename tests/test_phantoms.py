"""The phantom demo data: seeded, patient identity learnable, the finding visible."""

import numpy as np
import pytest

from unpersonal.data.phantoms import generate_phantoms


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    first, again = generate_phantoms(12, 32, seed=3), generate_phantoms(12, 32, seed=3)
    assert np.array_equal(first.images, again.images)
    assert np.array_equal(first.label, again.label)
    assert np.array_equal(first.patient_id, again.patient_id)
    other = generate_phantoms(12, 32, seed=4)
    assert other.images.shape != first.images.shape or not np.array_equal(other.images, first.images)


def test_shapes_types_and_scans_per_patient() -> None:
    made = generate_phantoms(30, 24, seed=0, scans_per_patient=(2, 4))
    assert made.images.dtype == np.uint8 and made.images.shape[1:] == (24, 24)
    assert made.label.dtype == np.int64 and len(made.label) == len(made.images)
    patients, counts = np.unique(made.patient_id, return_counts=True)
    assert len(patients) == 30 and counts.min() >= 2 and counts.max() <= 4
    assert set(made.label.tolist()) == {0, 1}
    for patient in patients:  # the finding is a property of the patient
        assert len(set(made.label[made.patient_id == patient].tolist())) == 1
    assert made.images.std() > 20  # an image, not a flat field


def test_a_patient_does_not_change_when_more_patients_are_drawn() -> None:
    few, many = generate_phantoms(10, 32, seed=1), generate_phantoms(20, 32, seed=1)
    for patient in ("phantom-0000", "phantom-0009"):
        assert np.array_equal(few.images[few.patient_id == patient],
                              many.images[many.patient_id == patient])


def test_scans_are_identified_by_their_patient_far_above_chance() -> None:
    """Nearest neighbour by pixel correlation finds the same patient: re-ID has signal to learn."""
    made = generate_phantoms(40, 32, seed=0)
    pixels = made.images.reshape(len(made.images), -1).astype(np.float64)
    pixels = (pixels - pixels.mean(1, keepdims=True)) / pixels.std(1, keepdims=True)
    similarity = pixels @ pixels.T
    np.fill_diagonal(similarity, -np.inf)
    has_sibling = np.array([(made.patient_id == p).sum() > 1 for p in made.patient_id])
    hits = made.patient_id[similarity.argmax(1)] == made.patient_id
    assert hits[has_sibling].mean() > 0.5  # measured 0.72 at seed 0; chance is 1/40


def test_the_finding_is_a_local_brightening_and_nothing_else() -> None:
    """Same patients with and without the finding differ only by a soft, bright opacity."""
    with_finding = generate_phantoms(10, 32, seed=2, finding_rate=1.0)
    without = generate_phantoms(10, 32, seed=2, finding_rate=0.0)
    assert with_finding.label.min() == 1 and without.label.max() == 0
    difference = with_finding.images.astype(int) - without.images.astype(int)
    per_scan = difference.reshape(len(difference), -1)
    assert per_scan.min() >= -1  # brighter or equal everywhere (rounding aside)
    assert (per_scan.max(1) >= 20).all()  # clearly visible at its centre
    assert ((np.abs(per_scan) > 2).mean(1) < 0.2).all()  # and local, not a global change


@pytest.mark.parametrize("arguments", [
    dict(n_patients=0, resolution=32, seed=0),
    dict(n_patients=5, resolution=8, seed=0),
    dict(n_patients=5, resolution=32, seed=-1),
    dict(n_patients=5, resolution=32, seed=0, scans_per_patient=(3, 2)),
    dict(n_patients=5, resolution=32, seed=0, finding_rate=1.5),
])
def test_bad_arguments_raise(arguments: dict) -> None:
    with pytest.raises(ValueError):
        generate_phantoms(**arguments)
