"""The downstream classifier: it learns what is in the pixels, for every label kind, on any
arrays (train on one set, test on another), reproducibly, resumably; and the AUC helpers."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from unpersonal.artifacts.classifier import Classifier, load_classifier
from unpersonal.config import ClassifierConfig
from unpersonal.errors import Interrupted, UserError
from unpersonal.metrics.auc import (bootstrap_auc_ci, bootstrap_auc_over_trainings,
                                    roc_auc_per_class)
from unpersonal.training import classifier as trainer
from unpersonal.training.classifier import fit_classifier
from unpersonal.training.common import cosine_lr
from unpersonal.training.loop import TrainingLoop
from tests.conftest import TINY

SIZE = 16
FAST = ClassifierConfig(width=4, epochs=4, batch_size=32, lr=3e-3, patience=4)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These 16 px models gain nothing from a second thread, which on a busy shared CPU mostly
    spins waiting (measured: 8x the CPU time for the same fit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_images(present: np.ndarray, seed: int, brightness: float = 0.5, noise: float = 0.08
                ) -> np.ndarray:
    """Noisy grey images [N, 16, 16] with a bright 4x4 blob in quadrant q wherever present[:, q].

    The label is plainly visible, so any working classifier should rank these almost perfectly.
    """
    rng = np.random.default_rng(seed)
    images = 0.3 + noise * rng.standard_normal((len(present), SIZE, SIZE))
    corners = [(2, 2), (2, 10), (10, 2), (10, 10)]
    for quadrant in range(present.shape[1]):
        y, x = corners[quadrant]
        images[present[:, quadrant] == 1, y:y + 4, x:x + 4] += brightness
    return images.clip(0, 1).astype(np.float32)


def blob_data(kind: str, count: int, seed: int, **look: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    if kind == "binary":
        labels = rng.integers(0, 2, (count, 1))
    elif kind == "multiclass":
        labels = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, count)]
    else:
        labels = rng.integers(0, 2, (count, 3))
    labels = labels.astype(np.uint8)
    return blob_images(labels, seed, **look), labels


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_learns_a_visible_label_and_ranks_held_out_images(kind: str) -> None:
    images, labels = blob_data(kind, 192, seed=0)
    val_images, val_labels = blob_data(kind, 64, seed=1)
    test_images, test_labels = blob_data(kind, 96, seed=2)
    model = fit_classifier(images, labels, kind, FAST, seed=0, val_images=val_images,
                           val_labels=val_labels, progress=None)
    probs = model.predict_proba(test_images)
    assert probs.shape == test_labels.shape and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    if kind == "multiclass":
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    names = [f"c{i}" for i in range(labels.shape[1])]
    scores = roc_auc_per_class(test_labels, probs, kind, names)
    assert scores["mean"] > 0.95, scores
    assert 1 <= model.history["best_epoch"] <= model.history["epochs_run"] <= FAST.epochs


def test_trains_on_one_set_and_scores_another() -> None:
    """The train-on-synthetic path: fit on images drawn differently, score on the 'real' ones."""
    synthetic, synthetic_labels = blob_data("binary", 192, seed=3, brightness=0.6, noise=0.12)
    real, real_labels = blob_data("binary", 128, seed=4, brightness=0.45, noise=0.06)
    model = fit_classifier(synthetic, synthetic_labels, "binary", FAST, seed=0, progress=None)
    assert model.history["best_epoch"] == FAST.epochs  # no validation: the last epoch is kept
    assert model.history["val_auc"] is None
    assert roc_auc_score(real_labels[:, 0], model.predict_proba(real)[:, 0]) > 0.95
    # The same trainer on labels that are noise learns nothing that carries over.
    shuffled = np.random.default_rng(0).permutation(synthetic_labels)
    guess = fit_classifier(synthetic, shuffled, "binary", FAST, seed=0, progress=None)
    assert roc_auc_score(real_labels[:, 0], guess.predict_proba(real)[:, 0]) < 0.75


def test_fine_tuning_starts_from_the_pretrained_weights() -> None:
    """The pretrain-then-fine-tune row: trained from `init`, a classifier keeps what the first
    set taught it; from its seed, the same short training on uninformative labels learns nothing."""
    images, labels = blob_data("binary", 192, seed=3)
    test_images, test_labels = blob_data("binary", 96, seed=4)
    pretrained = fit_classifier(images, labels, "binary", FAST, seed=0, progress=None)
    noise = np.random.default_rng(1).integers(0, 2, labels.shape).astype(np.uint8)
    brief = FAST.model_copy(update={"epochs": 1, "lr": 1e-4})
    tuned = fit_classifier(images, noise, "binary", brief, seed=1, progress=None,
                           init=pretrained)
    scratch = fit_classifier(images, noise, "binary", brief, seed=1, progress=None)
    auc = {name: roc_auc_score(test_labels[:, 0], model.predict_proba(test_images)[:, 0])
           for name, model in (("pretrained", pretrained), ("tuned", tuned),
                               ("scratch", scratch))}
    assert auc["pretrained"] > 0.95 and auc["tuned"] > 0.9 and auc["scratch"] < 0.75, auc
    assert not np.array_equal(tuned.predict_proba(test_images),
                              pretrained.predict_proba(test_images))  # it did train


def test_same_seed_same_predictions_other_seed_different() -> None:
    images, labels = blob_data("multilabel", 64, seed=5)
    settings = FAST.model_copy(update={"epochs": 2})
    runs = [fit_classifier(images, labels, "multilabel", settings, seed=seed, progress=None)
            for seed in (7, 7, 8)]
    first, again, other = (run.predict_proba(images) for run in runs)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    images, labels = blob_data("multiclass", 64, seed=6)
    model = fit_classifier(images, labels, "multiclass", FAST.model_copy(update={"epochs": 1}),
                           seed=0, progress=None, label_names=["a", "b", "c"])
    trainer.save_classifier(tmp_path / "saved", model, extra={"note": "kept"})
    loaded = load_classifier(tmp_path / "saved")
    np.testing.assert_array_equal(loaded.predict_proba(images), model.predict_proba(images))
    assert (loaded.label_kind, loaded.label_names, loaded.resolution) == ("multiclass",
                                                                          ["a", "b", "c"], SIZE)
    meta = json.loads((tmp_path / "saved" / "classifier.json").read_text())
    assert meta["note"] == "kept" and meta["architecture"]["width"] == FAST.width
    with pytest.raises(UserError, match="16, 16"):
        loaded.predict_proba(np.zeros((2, 8, 8), np.float32))

    smaller = fit_classifier(images, labels, "multiclass",
                             FAST.model_copy(update={"epochs": 1, "input_size": SIZE // 2}),
                             seed=0, progress=None)
    trainer.save_classifier(tmp_path / "smaller", smaller)
    reloaded = load_classifier(tmp_path / "smaller")
    assert reloaded.net.input_size == SIZE // 2
    np.testing.assert_array_equal(reloaded.predict_proba(images), smaller.predict_proba(images))


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = blob_data("binary", 64, seed=8)
    val_images, val_labels = blob_data("binary", 32, seed=9)
    settings = FAST.model_copy(update={"epochs": 3})  # 2 steps per epoch, 6 in all

    def fit(checkpoint: Path | None) -> Classifier:
        return fit_classifier(images, labels, "binary", settings, seed=0, val_images=val_images,
                              val_labels=val_labels, progress=None, checkpoint=checkpoint)

    straight = fit(None).predict_proba(val_images)
    calls, original = {"n": 0}, trainer.shift_and_jitter

    def interrupt_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "shift_and_jitter", interrupt_at_step_4)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupted, match="step 3 of 6"):
        fit(checkpoint)
    monkeypatch.setattr(trainer, "shift_and_jitter", original)
    resumed = fit(checkpoint)
    np.testing.assert_array_equal(resumed.predict_proba(val_images), straight)
    assert [row["epoch"] for row in resumed.history["log"]] == [1, 2, 3]


def test_the_clock_ends_a_cut_short_epoch_and_logs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_minutes spent within epoch 2 (the clock stubbed: 3 steps, then out of time)."""
    images, labels = blob_data("binary", 64, seed=8)
    val_images, val_labels = blob_data("binary", 32, seed=9)
    settings = FAST.model_copy(update={"epochs": 3, "max_minutes": 1.0})  # 2 steps per epoch
    clock = iter([False, False, False] + [True] * 10)
    monkeypatch.setattr(TrainingLoop, "out_of_time", lambda self: next(clock))
    model = fit_classifier(images, labels, "binary", settings, seed=0, val_images=val_images,
                           val_labels=val_labels, progress=None)
    log = model.history["log"]
    assert model.history["stopped_by"] == "max_minutes" and [row["epoch"] for row in log] == [1, 2]
    assert log[1]["lr"] == cosine_lr(2, 6, settings.lr)  # the rate of the epoch's one step


def test_early_stopping_keeps_the_best_validation_epoch() -> None:
    """Validation labels that are noise stop training after `patience` epochs without gain."""
    images, labels = blob_data("binary", 64, seed=10)
    val_images, _ = blob_data("binary", 32, seed=11)
    noise = np.random.default_rng(1).integers(0, 2, (32, 1)).astype(np.uint8)
    settings = FAST.model_copy(update={"epochs": 12, "patience": 2})
    model = fit_classifier(images, labels, "binary", settings, seed=0, val_images=val_images,
                           val_labels=noise, progress=None)
    log = model.history["log"]
    best = max(log, key=lambda row: row["val_auc"])
    assert model.history["best_epoch"] == best["epoch"]
    assert model.history["stopped_by"] == "patience" and len(log) == best["epoch"] + 2
    assert model.history["val_auc"] == best["val_auc"]


def test_bad_arrays_are_user_errors() -> None:
    images, labels = blob_data("binary", 8, seed=12)
    with pytest.raises(UserError, match="one column"):
        fit_classifier(images, np.ones((8, 2), np.uint8), "binary", FAST, 0, progress=None)
    with pytest.raises(UserError, match="one-hot"):
        fit_classifier(images, np.ones((8, 2), np.uint8), "multiclass", FAST, 0, progress=None)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        fit_classifier(images * 255, labels, "binary", FAST, 0, progress=None)
    with pytest.raises(UserError, match="N = 8"):
        fit_classifier(images, labels[:5], "binary", FAST, 0, progress=None)


def test_cli_stage_publishes_test_auc_per_class(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny = (*TINY, "--set", "phantoms.n_patients=40", "--set", "classifier.width=4",
            "--set", "classifier.epochs=2")
    assert cli("fit-classifier", "--out", run, *tiny).code == 2  # no prepare stage yet
    assert cli("prepare", "--out", run, *tiny).code == 0
    result = cli("fit-classifier", "--out", run, *tiny)
    assert result.code == 0, result.stderr
    folder = run / "fit-classifier"
    assert {p.name for p in folder.iterdir()} == {"classifier.safetensors", "classifier.json",
                                                 "training_log.csv"}
    meta = json.loads((folder / "classifier.json").read_text())
    assert meta["label_names"] == ["finding"] and meta["training"]["epochs_run"] == 2
    test = meta["test"]
    assert set(test["per_class"]) == {"finding"} and test["mean"] == test["per_class"]["finding"]
    low, high = test["ci95"]
    assert 0 <= low <= high <= 1
    assert f"{test['mean']:.3f}" in result.stderr and "95% CI" in result.stderr
    with open(folder / "training_log.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    assert not (run / ".work").exists()
    # The published weights reproduce the published test AUC.
    from unpersonal.data.canonical import load_canonical

    split = load_canonical(run / "prepare").subset("test")
    probs = load_classifier(folder).predict_proba(split.images_float())
    assert roc_auc_score(split.labels[:, 0], probs[:, 0]) == pytest.approx(test["mean"])
    assert "up to date" in cli("fit-classifier", "--out", run).stderr


# ---------------------------------------------------------------- ROC-AUC helpers


def test_roc_auc_per_class_matches_hand_computed_values() -> None:
    # Binary: of the 4 (positive, negative) pairs, 3 are ranked right -> 0.75.
    binary = roc_auc_per_class(np.array([[0], [0], [1], [1]]),
                               np.array([[0.1], [0.4], [0.35], [0.8]]), "binary", ["finding"])
    assert binary == {"per_class": {"finding": 0.75}, "mean": 0.75, "skipped": []}
    # Multi-label: column a perfect (1.0), column b reversed (0.0), column c all negative.
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.8, 0.2], [0.2, 0.2, 0.1], [0.8, 0.1, 0.3], [0.1, 0.9, 0.4]])
    multi = roc_auc_per_class(labels, probs, "multilabel", ["a", "b", "c"])
    assert multi == {"per_class": {"a": 1.0, "b": 0.0}, "mean": 0.5, "skipped": ["c"]}


def test_multiclass_auc_is_one_vs_rest_macro_like_sklearn() -> None:
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, 200)
    logits = rng.standard_normal((200, 3)) + 1.5 * np.eye(3)[classes]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ours = roc_auc_per_class(np.eye(3)[classes], probs, "multiclass", ["x", "y", "z"])
    assert ours["mean"] == pytest.approx(roc_auc_score(classes, probs, multi_class="ovr"))


def test_bootstrap_ci_of_perfect_and_of_random_scores() -> None:
    labels = np.array([0] * 5 + [1] * 5)[:, None]
    perfect = np.linspace(0, 1, 10)[:, None]
    assert bootstrap_auc_ci(labels, perfect, "binary", n=200, seed=0) == pytest.approx((1, 1))
    # Random scores, 200 positives and 200 negatives: AUC ~ 0.5 with standard error
    # sqrt((n1 + n0 + 1) / (12 n1 n0)) = 0.029 (Mann-Whitney), so a 95% interval ~ 0.11 wide.
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 200)[:, None]
    low, high = bootstrap_auc_ci(labels, rng.random((400, 1)), "binary", n=300, seed=0)
    assert low < 0.5 < high and 0.08 < high - low < 0.15


def test_bootstrap_over_patients_is_not_fooled_by_repeated_images() -> None:
    """Five copies of each image, one patient each: resampling patients gives the interval of
    the unique images; resampling images would claim five times the evidence."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, (60, 1))
    probs = np.clip(0.3 * labels + 0.7 * rng.random((60, 1)), 0, 1)
    unique = bootstrap_auc_ci(labels, probs, "binary", n=300, seed=4)
    copies, patients = np.repeat(labels, 5, axis=0), np.repeat(np.arange(60), 5)
    by_patient = bootstrap_auc_ci(copies, np.repeat(probs, 5, axis=0), "binary", n=300, seed=4,
                                  groups=patients)
    by_image = bootstrap_auc_ci(copies, np.repeat(probs, 5, axis=0), "binary", n=300, seed=4)
    assert by_patient == pytest.approx(unique)
    assert by_image[1] - by_image[0] < 0.7 * (unique[1] - unique[0])


def test_an_interval_over_trainings_covers_their_spread() -> None:
    """Three trainings that agree give about the test patients' interval alone; three that
    disagree (one much worse) give a wider one, around their mean; the gap to a shared baseline
    is paired."""
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, (300, 1))
    patients = np.arange(300) // 3

    def scores(signal: float, noise_seed: int) -> np.ndarray:
        noise = np.random.default_rng(noise_seed).random((300, 1))
        return np.clip(signal * labels + (1 - signal) * noise, 0, 1)[None]  # one seed

    same = np.stack([scores(0.3, 0)] * 3)
    alone = bootstrap_auc_ci(labels, same[0], "binary", n=400, seed=1, groups=patients)
    agreed = bootstrap_auc_over_trainings(labels, same, "binary", n=400, seed=1, groups=patients)
    assert agreed == pytest.approx(alone, abs=0.01)
    apart = np.stack([scores(0.3, 0), scores(0.3, 1), scores(0.05, 2)])
    low, high = bootstrap_auc_over_trainings(labels, apart, "binary", n=400, seed=1,
                                             groups=patients)
    means = [roc_auc_per_class(labels, one[0], "binary", ["x"])["mean"] for one in apart]
    assert low < np.mean(means) < high and high - low > 1.5 * (alone[1] - alone[0])
    gap = bootstrap_auc_over_trainings(labels, same, "binary", n=200, seed=1, groups=patients,
                                       baseline=same[0])
    assert gap == pytest.approx((0.0, 0.0))


def test_bootstrap_refuses_labels_without_both_values() -> None:
    with pytest.raises(ValueError, match="undefined"):
        bootstrap_auc_ci(np.ones((5, 1)), np.random.default_rng(0).random((5, 1)), "binary")
