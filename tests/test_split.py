"""The patient-level split unpersonal makes when the data brings none."""

from pathlib import Path

import numpy as np

from unpersonal.config import load_config
from unpersonal.data.prepare import build_canonical
from unpersonal.data.split import PROBE, hold_out_identity_probes, patient_groups, split_patients
from tests.conftest import random_images, write_flat_npz


def _patients_and_labels(n_patients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, n_patients)
    patients = np.repeat([f"P{i:04d}" for i in range(n_patients)], counts)
    per_patient_label = (rng.random(n_patients) < 0.3).astype(np.uint8)
    return patients, np.repeat(per_patient_label, counts)[:, None]


def test_no_patient_lands_in_two_splits_and_shares_are_close() -> None:
    patients, labels = _patients_and_labels(600)
    split = split_patients(patient_groups(patients, [str(i) for i in range(len(patients))]),
                           labels, (0.8, 0.1, 0.1), seed=0)
    for patient in np.unique(patients):
        assert len(set(split[patients == patient])) == 1
    shares = [np.mean(split == name) for name in ("train", "val", "test")]
    assert np.allclose(shares, (0.8, 0.1, 0.1), atol=0.02)
    for name in ("train", "val", "test"):  # stratified: each split has the overall positive rate
        assert abs(labels[split == name].mean() - labels.mean()) < 0.03


def test_split_is_seeded() -> None:
    patients, labels = _patients_and_labels(200)
    groups = patient_groups(patients, [str(i) for i in range(len(patients))])
    first = split_patients(groups, labels, (0.8, 0.1, 0.1), seed=1)
    assert np.array_equal(first, split_patients(groups, labels, (0.8, 0.1, 0.1), seed=1))
    assert not np.array_equal(first, split_patients(groups, labels, (0.8, 0.1, 0.1), seed=2))


def test_patients_sharing_an_image_are_kept_together() -> None:
    patients = np.array(["A", "A", "B", "C", "C", "D"])
    digests = ["a1", "shared", "shared", "c1", "c2", "d1"]
    groups = patient_groups(patients, digests)
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 1, 2], [3, 4], [5]]


def test_prepare_without_split_makes_one_by_patient(tmp_path: Path) -> None:
    images = random_images(120)
    images[7] = images[90]  # one image filed under two patients: must not straddle splits
    path = write_flat_npz(tmp_path / "d.npz", count=120, images=images,
                          patients=[f"P{i // 3:03d}" for i in range(120)])
    config = load_config("cpu", None, ["data.resolution=16"], data_source=path)
    data = build_canonical(config.data, config.phantoms, config.seed)
    assert data.meta["summary"]["shared_patients"] == 0
    assert data.split[7] == data.split[90]
    counts = [int((data.split == name).sum()) for name in ("train", "val", "test")]
    assert 88 <= counts[0] <= 102 and counts[1] >= 6 and counts[2] >= 6
    assert "made by unpersonal" in data.meta["split"]


def test_identity_probes_are_one_unseen_image_of_some_multi_image_training_patients() -> None:
    patients, labels = _patients_and_labels(600)
    digests = [str(i) for i in range(len(patients))]
    digests[5] = digests[700]  # an image with a twin is never a probe
    split = split_patients(patient_groups(patients, digests), labels, (0.8, 0.1, 0.1), seed=0)
    probed = hold_out_identity_probes(split, patients, digests, 0.05, seed=3)
    probes = np.flatnonzero(probed == PROBE)
    train_before = int((split == "train").sum())
    assert len(probes) == round(0.05 * (train_before - np.sum(split[[5, 700]] == "train")))
    assert (split[probes] == "train").all() and 5 not in probes and 700 not in probes
    assert len(set(patients[probes])) == len(probes)  # one per patient
    for patient in patients[probes]:  # each keeps two training images or more
        assert np.sum((patients == patient) & (probed == "train")) >= 2
    unchanged = probed != PROBE
    assert np.array_equal(probed[unchanged], split[unchanged])
    assert np.array_equal(probed, hold_out_identity_probes(split, patients, digests, 0.05, 3))
    assert not np.array_equal(probed, hold_out_identity_probes(split, patients, digests, 0.05, 4))
    assert np.array_equal(hold_out_identity_probes(split, patients, digests, 0.0, 3), split)


def test_identity_probes_are_capped_by_the_patients_that_can_spare_one() -> None:
    patients = np.repeat(["A", "B", "C"], [3, 2, 5])
    split = np.array(["train"] * 10, dtype="<U5")
    probed = hold_out_identity_probes(split, patients, [str(i) for i in range(10)], 0.45, 0)
    assert sorted(patients[probed == PROBE]) == ["A", "C"]  # B has two images only
