"""`unpersonal evaluate` on a small phantom run: the metrics file, and its figures on known sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.evaluate import TRAINING_SETS
from unpersonal.evaluation.sets import AUDIT_EMBEDDER
from unpersonal.stages import audit_config
from unpersonal.stages.evaluate import evaluate_run_set
from unpersonal.metrics.auc import roc_auc_per_class
from unpersonal.rundir import RunDir


def test_evaluate_writes_every_figure_with_its_reference(released_run: Path) -> None:
    metrics = json.loads((released_run / "eval" / "metrics.json").read_text())
    released = len(list((released_run / "generate" / "synthetic").glob("*.png")))
    assert metrics["schema"] == 1 and metrics["synthetic_images"] == released
    fidelity = metrics["fidelity"]
    for key in ("fd", "fd_real_test", "kid", "kid_real_test", "prdc", "prdc_real_test", "vendi",
                "retrieval"):
        assert key in fidelity, key
    classes = metrics["utility"]["classification"]
    assert classes["seeds"] == 2
    for name in TRAINING_SETS:
        figures = classes[name]
        assert len(figures["per_seed"]) == 2
        assert figures["mean"] == pytest.approx(np.mean(figures["per_seed"]))
        assert figures["ci95"][0] <= figures["ci95"][1]
    assert classes["gap_pp"] == pytest.approx(
        100 * (classes["synthetic"]["mean"] - classes["real"]["mean"]))
    low, high = classes["gap_pp_ci95"]
    assert low <= high
    for task in ("denoise", "sr"):
        assert metrics["utility"]["restoration"][task]["test_images"] > 0
    assert Image.open(released_run / "eval" / "roc.png").size[0] > 300


def test_the_saved_test_probabilities_give_the_reported_aucs(released_run: Path) -> None:
    """A later comparison reuses the real-trained classifiers through eval/test_probs.npz."""
    metrics = json.loads((released_run / "eval" / "metrics.json").read_text())
    dataset = load_canonical(released_run / "prepare")
    test = dataset.subset("test")
    with np.load(released_run / "eval" / "test_probs.npz") as saved:
        np.testing.assert_array_equal(saved["labels"], test.labels)
        for name in TRAINING_SETS:
            per_seed = [roc_auc_per_class(test.labels, probs, test.label_kind,
                                          test.label_names)["mean"] for probs in saved[name]]
            reported = metrics["utility"]["classification"][name]["per_seed"]
            assert per_seed == pytest.approx(reported), name


def test_the_audit_models_train_apart_and_leave_the_run_config_alone(released_run: Path) -> None:
    config = load_config(config_file=released_run / "config.yaml")
    assert config.seed == 0 and config.embedder.width == 4  # the run's, not the audit's
    derived = audit_config(config)
    assert derived.seed == config.seed + config.audit.seed_offset
    assert derived.embedder.width == config.audit.embedder_width != config.embedder.width
    meta = json.loads((released_run / AUDIT_EMBEDDER / "embedder.json").read_text())
    filter_meta = json.loads((released_run / "fit-embedder" / "embedder.json").read_text())
    assert meta != filter_meta


def classification_only(run: Path):
    """The run's config with evaluate's figures cut to fidelity and the synthetic classifier."""
    config = load_config(config_file=run / "config.yaml").model_copy()
    config.evaluate.restoration = False
    config.evaluate.real_plus_synthetic = False
    config.evaluate.pretrain_finetune = False
    config.evaluate.bootstrap = 20
    return config


def test_the_training_set_judged_as_if_synthetic_is_a_perfect_copy(released_run: Path) -> None:
    """Worst case for privacy, best for fidelity: FD 0, every training image retrieved."""
    run, config = RunDir(released_run), classification_only(released_run)
    dataset = load_canonical(released_run / "prepare")
    train = dataset.subset("train")
    metrics, _ = evaluate_run_set(config, run, dataset, train.images_float(), train.labels)
    fidelity = metrics["fidelity"]
    assert fidelity["fd"] == pytest.approx(0, abs=1e-4)
    assert fidelity["prdc"]["precision"] == 1 and fidelity["prdc"]["coverage"] == 1
    # Each training image queried is its own nearest neighbour.
    assert fidelity["retrieval"]["synthetic"] == pytest.approx(
        fidelity["retrieval"]["queries"] / len(train))
    # Trained on the real images, seed for seed: the same classifier, a zero gap.
    assert metrics["utility"]["classification"]["gap_pp"] == pytest.approx(0, abs=1e-6)


def test_a_setting_is_measured_on_the_validation_split(released_run: Path) -> None:
    """Choosing a setting reads the validation split, so the test split reports once."""
    from unpersonal.evaluation.fidelity import frechet_distance
    from unpersonal.evaluation.sets import read_synthetic_set

    run, config = RunDir(released_run), classification_only(released_run)
    config.evaluate.classifier_seeds = 1
    dataset = load_canonical(released_run / "prepare")
    released = read_synthetic_set(released_run / "generate" / "synthetic", dataset.label_names)
    metrics, curves = evaluate_run_set(config, run, dataset, released.images, released.labels,
                                       split="val")
    val = dataset.subset("val")
    assert metrics["measured_on"] == "val" and len(val) != len(dataset.subset("test"))
    assert metrics["utility"]["classification"]["test_images"] == len(val)
    np.testing.assert_array_equal(curves["labels"], val.labels)
    features = np.load(released_run / AUDIT_EMBEDDER / "features.npy")
    assert metrics["fidelity"]["fd_real_test"] == pytest.approx(frechet_distance(
        features[dataset.split == "train"], features[dataset.split == "val"]))
    reported = json.loads((released_run / "eval" / "metrics.json").read_text())
    assert reported["measured_on"] == "test"
