"""`prepare` on .npz inputs: both layouts, every label kind, and the patient-level safety checks."""

from pathlib import Path

import numpy as np
import pytest

from unpersonal.config import load_config
from unpersonal.data.prepare import build_canonical
from unpersonal.errors import UserError
from tests.conftest import random_images, write_flat_npz


def _prepare(path: Path, *overrides: str):
    config = load_config("cpu", None, ["data.resolution=16", *overrides], data_source=path)
    return build_canonical(config.data, config.phantoms, config.seed)


def test_flat_npz_keeps_given_split_patients_and_labels(tmp_path: Path) -> None:
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    data = _prepare(write_flat_npz(tmp_path / "d.npz", splits=splits))
    assert len(data) == 24 and data.images.shape == (24, 16, 16) and data.images.dtype == np.uint8
    assert data.split.tolist() == splits
    assert data.patient_id[:3].tolist() == ["P000", "P000", "P001"]
    assert data.label_kind == "binary" and data.labels[:, 0].tolist() == [0, 1] * 12
    assert data.meta["summary"]["shared_patients"] == 0
    assert data.meta["split"] == "given with the data"


def test_images_survive_unchanged_at_native_resolution(tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz", size=16)
    assert np.array_equal(_prepare(path).images, np.load(path)["images"])


def test_medmnist_multiclass_becomes_one_hot_and_keeps_splits(tmp_path: Path) -> None:
    arrays = {}
    for split, count in (("train", 20), ("val", 5), ("test", 5)):
        arrays[f"{split}_images"] = random_images(count, 16, seed=len(arrays))
        arrays[f"{split}_labels"] = (np.arange(count) % 4).reshape(-1, 1)
    np.savez(tmp_path / "m.npz", **arrays)
    data = _prepare(tmp_path / "m.npz", "data.no_patient_ids=true")
    assert data.label_kind == "multiclass" and data.labels.shape == (30, 4)
    assert data.labels.sum(axis=1).tolist() == [1] * 30
    assert data.labels[:5].argmax(axis=1).tolist() == [0, 1, 2, 3, 0]
    assert (data.split == "train").sum() == 20 and (data.split == "test").sum() == 5
    assert len(set(data.patient_id.tolist())) == 30  # each image its own patient


def test_medmnist_multilabel_rgb_is_greyed_with_a_note(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz",
             train_images=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 2, (12, 3)),
             val_images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
             val_labels=rng.integers(0, 2, (4, 3)),
             test_images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
             test_labels=rng.integers(0, 2, (4, 3)))
    data = _prepare(tmp_path / "c.npz", "data.no_patient_ids=true")
    assert data.label_kind == "multilabel" and data.labels.shape == (20, 3)
    assert data.images.shape == (20, 16, 16)
    assert any("converted to grey" in note for note in data.meta["notes"])


def test_missing_patient_ids_are_refused_without_the_flag(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", train_images=random_images(4), train_labels=np.zeros((4, 1)))
    with pytest.raises(UserError, match="4 of 4 images have no patient ID.*--no-patient-ids"):
        _prepare(tmp_path / "m.npz")


def test_empty_patient_id_is_refused_naming_the_row(tmp_path: Path) -> None:
    patients = [f"P{i}" for i in range(24)]
    patients[5] = " "
    with pytest.raises(UserError, match="1 of 24 images have no patient ID .first: d.npz row 5"):
        _prepare(write_flat_npz(tmp_path / "d.npz", patients=patients))


def test_patient_in_two_splits_is_refused_naming_the_patient(tmp_path: Path) -> None:
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    splits[1] = "test"  # P000's second image
    with pytest.raises(UserError, match=r"patient 'P000' is in two splits: train \(d.npz row 0\) "
                                        r"and test \(d.npz row 1\)"):
        _prepare(write_flat_npz(tmp_path / "d.npz", splits=splits))


def test_same_image_in_two_splits_is_refused_naming_both_rows(tmp_path: Path) -> None:
    images = random_images(24)
    images[20] = images[3]
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    with pytest.raises(UserError, match=r"same image is in train \(d.npz row 3\) and test "
                                        r"\(d.npz row 20\)"):
        _prepare(write_flat_npz(tmp_path / "d.npz", splits=splits, images=images))


def test_nan_pixels_are_refused_naming_the_row(tmp_path: Path) -> None:
    images = random_images(24).astype(np.float32) / 255
    images[7, 2, 3] = np.nan
    images[9, 0, 0] = np.inf
    with pytest.raises(UserError, match="d.npz row 7: 1 pixels are NaN or infinite"):
        _prepare(write_flat_npz(tmp_path / "d.npz", images=images))


def test_float_images_outside_unit_range_are_refused(tmp_path: Path) -> None:
    images = random_images(24).astype(np.float32)  # 0..255 stored as float
    with pytest.raises(UserError, match=r"row 0: float pixel values span \[.*\]; expected \[0, 1\]"):
        _prepare(write_flat_npz(tmp_path / "d.npz", images=images))


def test_label_and_image_count_mismatch_is_refused(tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz", label=np.zeros(23, dtype=int))
    with pytest.raises(UserError, match=r"disagree on the number of images \(images: 24, label: 23"):
        _prepare(path)


def test_empty_dataset_and_missing_arrays_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "e.npz", images=np.zeros((0, 8, 8), np.uint8), label=np.zeros(0),
             patient_id=np.array([], dtype=str))
    with pytest.raises(UserError, match="e.npz: holds no images"):
        _prepare(tmp_path / "e.npz")
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 8, 8)))
    with pytest.raises(UserError, match="x.npz: no 'images' array"):
        _prepare(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match="y.npz: no 'label' array"):
        _prepare(tmp_path / "y.npz")


def test_non_integer_or_negative_labels_are_refused(tmp_path: Path) -> None:
    labels = (np.arange(24) % 2).astype(float)
    labels[4] = 0.5
    with pytest.raises(UserError, match=r"d.npz row 4: label \[0.5\] is not a whole number"):
        _prepare(write_flat_npz(tmp_path / "d.npz", label=labels))
    labels[4] = -1
    with pytest.raises(UserError, match="row 4: class label -1 is negative"):
        _prepare(write_flat_npz(tmp_path / "d.npz", label=labels))


def test_truncated_npz_is_refused(tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="d.npz: not a readable .npz"):
        _prepare(path)


def test_sixteen_bit_input_stays_sixteen_bit(tmp_path: Path) -> None:
    images = (random_images(24).astype(np.uint16) * 257)
    data = _prepare(write_flat_npz(tmp_path / "d.npz", images=images))
    assert data.bit_depth == 16 and data.images.dtype == np.uint16
    assert np.array_equal(data.images, images)
    assert _prepare(tmp_path / "d.npz", "data.bit_depth=8").images.dtype == np.uint8


def test_larger_images_are_resized_and_smaller_ones_warned(tmp_path: Path) -> None:
    data = _prepare(write_flat_npz(tmp_path / "big.npz", size=32))
    assert data.images.shape == (24, 16, 16) and not data.meta["warnings"]
    small = _prepare(write_flat_npz(tmp_path / "small.npz", size=8))
    assert small.images.shape == (24, 16, 16)
    assert small.meta["warnings"] == ["24 images are smaller than 16 px and were upsampled "
                                      "(first: small.npz row 0)"]
