"""`unpersonal evaluate`: fidelity, diversity and utility of the released set."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import numpy as np

from unpersonal.artifacts.classifier import Classifier
from unpersonal.config import Config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.evaluation.evaluate import evaluate_set, roc_plot
from unpersonal.errors import UserError
from unpersonal.evaluation.sets import AUDIT_EMBEDDER, read_synthetic_set
from unpersonal.rundir import RunDir, write_atomic, write_npz_atomic
from unpersonal.stages import StageTask
from unpersonal.training.classifier import fit_classifier


def build_evaluate(task: StageTask) -> dict[str, Any]:
    """Measure the released set; returns metrics.json's content (with the audit's figures when
    the run has them)."""
    config, run = task.config, task.run
    dataset = load_canonical(task.input("prepare"))
    released = read_synthetic_set(task.input("generate") / "synthetic", dataset.label_names)
    fewest = config.evaluate.prdc_k + 1
    if len(released.images) < fewest:
        raise UserError(f"evaluate: the release has {len(released.images)} images; coverage "
                        f"and recall need at least {fewest} (evaluate.prdc_k + 1): generate "
                        "more (generate.count) or lower evaluate.prdc_k")
    metrics, curves = evaluate_run_set(config, run, dataset, released.images, released.labels)
    audit = task.input("audit") / "privacy.json"
    if run.stage_record("audit") is not None and audit.is_file():
        metrics["privacy"] = json.loads(audit.read_text())
    with task.output() as folder:
        write_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_atomic(folder / "roc.png", roc_plot(curves, dataset.label_names))
        write_npz_atomic(folder / "test_probs.npz", **curves)
    return metrics


def evaluate_run_set(config: Config, run: RunDir, dataset: CanonicalDataset, images: np.ndarray,
                     labels: np.ndarray, real_probs: np.ndarray | None = None,
                     split: str = "test") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`evaluate_set` with a run's models and settings (the benchmarks score other sets too,
    and on the validation split, `split="val"`, when they choose a setting)."""
    return evaluate_set(dataset, images, labels, config.evaluate, config.seed,
                        run.stage_path(AUDIT_EMBEDDER), run.stage_path("fit-classifier"),
                        partial(train_classifier, config, dataset), real_probs, split)


def train_classifier(config: Config, dataset: CanonicalDataset, images: np.ndarray,
                     labels: np.ndarray, seed: int, progress: str,
                     init: Classifier | None = None) -> Classifier:
    """fit-classifier's trainer and settings on another training set (from `init`'s weights
    when given), early-stopped on the run's real validation split."""
    val = dataset.subset("val")
    return fit_classifier(images, labels, dataset.label_kind, config.classifier, seed,
                          val_images=val.images_float() if len(val) else None,
                          val_labels=val.labels if len(val) else None, progress=progress,
                          label_names=dataset.label_names, init=init)
