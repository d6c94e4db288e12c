"""`unpersonal fit-classifier`: the real-data baseline classifier, scored on the test split."""

from __future__ import annotations

from typing import Any

from unpersonal.data.canonical import load_canonical
from unpersonal.errors import UserError
from unpersonal.stages import StageTask
from unpersonal.training.classifier import fit_classifier, publish, score_split


def build_fit_classifier(task: StageTask) -> dict[str, Any]:
    """Train on the real train split, stop early on val, score on test; returns
    classifier.json's content."""
    config = task.config
    work = task.work_dir()
    dataset = load_canonical(task.input("prepare"))
    train, val, test = (dataset.subset(split) for split in ("train", "val", "test"))
    if len(train) < 2:
        raise UserError(f"the training split has {len(train)} image(s): nothing to train the "
                        "classifier on")
    classifier = fit_classifier(
        train.images_float(), train.labels, dataset.label_kind, config.classifier, config.seed,
        val_images=val.images_float() if len(val) else None,
        val_labels=val.labels if len(val) else None, label_names=dataset.label_names,
        checkpoint=work / "checkpoint.pt", stage=task.name)
    scores = {"val": score_split(classifier, val, config.seed),
              "test": score_split(classifier, test, config.seed)}
    with task.output() as folder:
        meta = publish(folder, classifier, scores)
    task.run.clear_work(task.name)
    return meta
