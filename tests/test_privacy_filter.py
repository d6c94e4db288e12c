"""The combined privacy filter on a tiny phantom run: calibrate, planted copies, held-out images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY
from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.privacy.filter import CHECKS
from unpersonal.privacy.planted import PERTURBATIONS, plant_copies
from unpersonal.rundir import RunDir
from unpersonal.stages.calibrate import load_filter

SMALL_MODELS = ("--set", "phantoms.n_patients=24", "--set", "embedder.width=4",
                "--set", "embedder.steps=10", "--set", "embedder.batch_size=16",
                "--set", "reid.width=4", "--set", "reid.steps=10", "--set", "reid.batch_size=8",
                "--set", "reid.validate_every=5")


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unpersonal.cli import app
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("filter") / "run"
    runner = CliRunner()
    for command in ("prepare", "fit-embedder", "fit-reid", "calibrate"):
        result = runner.invoke(app, [command, "--out", str(root), *TINY, *SMALL_MODELS])
        assert result.exit_code == 0, (command, result.output)
    return root


def test_planted_copies_are_mild_and_all_different() -> None:
    # Smooth images, as radiographs are: on white noise any shift is a large change.
    from scipy import ndimage

    noise = np.random.default_rng(0).uniform(0.0, 1.0, (6, 32, 32))
    images = np.stack([ndimage.gaussian_filter(n, 3) for n in noise])
    images = ((images - images.min()) / np.ptp(images) * 0.6 + 0.2).astype(np.float32)
    copies = plant_copies(images, seed=1)
    assert list(copies) == list(PERTURBATIONS)
    for name, copy in copies.items():
        rmse = np.sqrt(((copy - images) ** 2).mean(axis=(1, 2)))
        assert copy.shape == images.shape and copy.min() >= 0 and copy.max() <= 1, name
        assert (rmse > 0).all(), f"{name} left an image unchanged"
        assert (rmse < 0.2).all(), f"{name} is no longer a near-copy (RMSE {rmse.max():.3f})"
    assert np.array_equal(plant_copies(images, seed=1)["all"], copies["all"])  # seeded


def test_calibrate_writes_floors_from_validation_patients(calibrated_run: Path) -> None:
    summary = json.loads((calibrated_run / "calibrate" / "floors.json").read_text())
    dataset = load_canonical(calibrated_run / "prepare")
    assert summary["calibrated_on"] == "val"
    assert summary["n_heldout"] == int((dataset.split == "val").sum())
    for space in ("embedding", "pixel"):
        floor = summary["floors"][space]
        assert floor["value"] <= floor["heldout_summary"]["median"]
    reid_train = np.load(calibrated_run / "calibrate" / "reid_train.npy")
    assert len(reid_train) == int((dataset.split == "train").sum())
    assert np.allclose(np.linalg.norm(reid_train, axis=1), 1, atol=1e-5)


def test_exact_training_copies_are_rejected_by_every_check(calibrated_run: Path) -> None:
    run = RunDir(calibrated_run)
    privacy_filter = load_filter(load_config(config_file=calibrated_run / "config.yaml"), run)
    dataset = load_canonical(calibrated_run / "prepare")
    train = dataset.images_float()[dataset.split == "train"]
    rows = np.arange(min(8, len(train)))
    result = privacy_filter.check(train[rows], sources=rows)
    for check in CHECKS:
        assert result.flags[check].all(), check
    assert np.array_equal(result.embedding_nearest, rows)
    assert np.array_equal(result.pixel_nearest, rows)
    assert np.allclose(result.pixel_distance, 0, atol=1e-6)


def test_heldout_images_mostly_pass_the_distance_floors(calibrated_run: Path) -> None:
    run = RunDir(calibrated_run)
    privacy_filter = load_filter(load_config(config_file=calibrated_run / "config.yaml"), run)
    dataset = load_canonical(calibrated_run / "prepare")
    val = dataset.images_float()[dataset.split == "val"]
    result = privacy_filter.check(val)
    # Calibrated on exactly these images at the 1% quantile (interpolated): at most 1% of
    # them, plus the one the interpolation may put just under the floor, fall below it.
    for space in ("embedding", "pixel"):
        assert result.flags[space].sum() <= 1 + 0.01 * len(val), space


def test_calibrate_needs_the_privacy_models(tmp_path: Path, cli) -> None:
    assert cli("prepare", "--out", tmp_path / "run", *TINY).code == 0
    result = cli("calibrate", "--out", tmp_path / "run", *TINY)
    assert result.code == 2
    assert "fit-embedder" in result.stderr


def test_the_any_patient_check_passes_held_out_patients_as_calibrated(calibrated_run: Path) -> None:
    """A maximum over every training patient gets its own threshold: the pair threshold would
    link almost any new patient's image to someone by chance."""
    summary = json.loads((calibrated_run / "calibrate" / "floors.json").read_text())
    assert summary["reid_neighbour_threshold"] >= summary["reid_threshold"]
    config = load_config(config_file=calibrated_run / "config.yaml")
    privacy_filter = load_filter(config, RunDir(calibrated_run))
    assert privacy_filter.any_patient_threshold == summary["reid_neighbour_threshold"]
    dataset = load_canonical(calibrated_run / "prepare")
    val = dataset.images_float()[dataset.split == "val"]
    linked = privacy_filter.check(val).flags["reid"]
    quantile = config.privacy.reid_heldout_quantile
    assert linked.mean() <= (1 - quantile) + 1 / len(val)


def test_the_pair_check_against_the_source_holds_candidates_drawn_from_it(
        calibrated_run: Path) -> None:
    """The pair threshold flags most images of two different patients, so it applies to a
    candidate and its source only when the candidate was drawn from that image; drawn from the
    labels alone, its source is checked like every other training image. A copy of the source
    is rejected either way."""
    config = load_config(config_file=calibrated_run / "config.yaml")
    privacy_filter = load_filter(config, RunDir(calibrated_run))
    dataset = load_canonical(calibrated_run / "prepare")
    train = dataset.images_float()[dataset.split == "train"]
    val = dataset.images_float()[dataset.split == "val"]
    sources = np.arange(len(val)) % len(train)
    drawn = privacy_filter.check(val, sources, drawn_from_source=True)
    labels_only = privacy_filter.check(val, sources, drawn_from_source=False)
    to_source = drawn.reid_source_score >= privacy_filter.reid.scorer.threshold
    to_anyone = drawn.reid_score >= privacy_filter.any_patient_threshold
    assert (to_source & ~to_anyone).any()  # the two rules differ on these images
    assert np.array_equal(drawn.flags["reid"], to_source | to_anyone)
    assert np.array_equal(labels_only.flags["reid"], to_anyone)
    rows = np.arange(min(8, len(train)))
    assert privacy_filter.check(train[rows], rows, drawn_from_source=False).rejected.all()


def test_the_pixel_floor_holds_against_every_training_image(calibrated_run: Path) -> None:
    """Each candidate's pixel distance is its distance to the nearest of ALL training images
    at every shift (brute force here), whatever the networks think of it: a copy the embedder
    and the re-ID network do not place near its original is still caught."""
    from unpersonal.privacy.floor import AlignedPixels

    config = load_config(config_file=calibrated_run / "config.yaml")
    privacy_filter = load_filter(config, RunDir(calibrated_run))
    dataset = load_canonical(calibrated_run / "prepare")
    train = dataset.subset("train").images_float()
    queries = np.concatenate([dataset.subset("test").images_float(), train[::-1][:5, :, ::-1]])
    checked = privacy_filter.check(queries, drawn_from_source=False)
    space = AlignedPixels.from_settings(config.privacy)
    reference = space.reference(train)
    brute = np.min([1 - (shifted @ reference.T).max(axis=1) for shifted in space.shifted(queries)],
                   axis=0)
    np.testing.assert_allclose(checked.pixel_distance, np.maximum(brute, 0), atol=1e-5)
