"""Linear probe: how much label information a frozen feature space carries.

A logistic regression fitted on training-split features and scored by ROC-AUC on the test split
is the usual yardstick for self-supervised features (Chen et al. 2020): the features are never
trained on labels, so a high probe AUC says the labels are linearly readable from them.
`fit-embedder` reports it for the features it publishes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

LABEL_KINDS = ("binary", "multiclass", "multilabel")


def linear_probe_auc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     test_y: np.ndarray, label_kind: str, label_names: list[str]
                     ) -> dict[str, Any]:
    """Fit on (train_x, train_y), report ROC-AUC per label column on (test_x, test_y).

    Labels are indicator columns [N, C] as `prepare` writes them: binary one column, multiclass
    one-hot (one multinomial model, scored one-vs-rest per class), multilabel one model per
    column. A column whose test labels are all one class has no AUC, and one whose training
    labels are all one class cannot be fitted; both are listed under "skipped" with the reason
    rather than reported as a made-up 0.5.

    Returns {"per_label": {name: auc}, "mean_auc": float | None, "skipped": {name: reason},
    "n_train": int, "n_test": int}.
    """
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = _as_columns(train_y), _as_columns(test_y)
    _check_shapes(train_x, train_y, test_x, test_y, label_kind, label_names)
    skipped: dict[str, str] = {}
    scores: dict[str, np.ndarray] = {}
    if len(test_x) == 0 or len(train_x) == 0:
        empty = "test" if len(test_x) == 0 else "training"
        skipped = {name: f"the {empty} split is empty" for name in label_names}
    elif label_kind == "multiclass":
        scores = _multiclass_scores(train_x, train_y, test_x, label_names, skipped)
    else:
        for column, name in enumerate(label_names):
            if len(np.unique(train_y[:, column])) < 2:
                skipped[name] = "one class in the training split"
                continue
            scores[name] = _fit(train_x, train_y[:, column]).predict_proba(test_x)[:, 1]
    per_label: dict[str, float] = {}
    for column, name in enumerate(label_names):
        if name not in scores:
            continue
        if len(np.unique(test_y[:, column])) < 2:
            skipped[name] = "one class in the test split"
            continue
        per_label[name] = float(roc_auc_score(test_y[:, column], scores[name]))
    mean = float(np.mean(list(per_label.values()))) if per_label else None
    return {"per_label": per_label, "mean_auc": mean, "skipped": skipped,
            "n_train": len(train_x), "n_test": len(test_x)}


def _as_columns(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    return labels[:, None] if labels.ndim == 1 else labels


def _check_shapes(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, label_kind: str, label_names: list[str]) -> None:
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind {label_kind!r}: expected one of {LABEL_KINDS}")
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {train_x.shape} and "
                         f"{test_x.shape}")
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if len(x) != len(y) or y.shape[1] != len(label_names):
            raise ValueError(f"{split}: {len(x)} feature rows and labels {y.shape}, expected "
                             f"[{len(x)}, {len(label_names)}] for labels {label_names}")


def _fit(x: np.ndarray, y: np.ndarray) -> Any:
    """Standardised features, L2-regularised logistic regression (C = 1).

    Standardising lets one C suit feature spaces of any scale. A fit stopped at max_iter is still
    a valid linear probe, so convergence warnings are not passed on.
    """
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def _multiclass_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       label_names: list[str], skipped: dict[str, str]) -> dict[str, np.ndarray]:
    """One multinomial model on the class index; each class's probability is its OvR score."""
    classes = train_y.argmax(axis=1)
    present = np.unique(classes)
    for column, name in enumerate(label_names):
        if column not in present:
            skipped[name] = "class absent from the training split"
    if len(present) < 2:
        for column in present:
            skipped[label_names[column]] = "one class in the training split"
        return {}
    probabilities = _fit(train_x, classes).predict_proba(test_x)
    return {label_names[column]: probabilities[:, position]
            for position, column in enumerate(present)}
