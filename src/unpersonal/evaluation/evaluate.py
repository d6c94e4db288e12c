"""`unpersonal evaluate`: fidelity, diversity and utility of the released set, each with its baseline.

    run/eval/
        metrics.json   every figure (schema below); the report and the datasheet read it
        roc.png        test ROC curves of the classifiers trained on real, synthetic, both
        test_probs.npz the classifiers' test-split probabilities, one [seeds, N_test, C] array
                       per training set ("real", "synthetic", "real+synthetic") and "labels":
                       a later comparison (benchmarks/kermany.py) reuses the real ones

Every figure comes with the value a real held-out set gets (the test split, never used to train
or choose anything), because a number alone does not say whether it is good:

    {"schema": 1, "synthetic_images": N, "measured_on": "test" (or "val", choosing a setting),
     "fidelity": {"feature_space", "fd", "fd_real_test", "kid": {"mean", "std"},
                  "kid_real_test", "prdc": {precision, recall, density, coverage},
                  "prdc_real_test", "vendi": {"synthetic", "real_train", "real_test"},
                  "retrieval": {"synthetic", "real_test", "queries"}},
     "utility": {"classification": {"seeds", "test_images", "real" | "synthetic" |
                                    "real+synthetic" | "synthetic-then-real":
                                        {"mean", "std_over_seeds", "ci95", "per_class"},
                                    "gap_pp", "gap_pp_ci95", "gap_pp_real+synthetic", ...},
                 "restoration": {"denoise": {...}, "sr": {...}}   (see restoration.py)},
     "privacy": the audit's privacy.json when the audit has run}

Fidelity is measured in the audit embedder's space, against the training images the generator
imitated; the real test images measured the same way are the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from unpersonal.artifacts.classifier import Classifier, load_classifier
from unpersonal.artifacts.embedder import load_embedder
from unpersonal.config import EvaluateConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.evaluation.fidelity import (frechet_distance, kernel_inception_distance, prdc,
                                            retrieval_score, vendi_score)
from unpersonal.evaluation.plots import png_bytes, pyplot
from unpersonal.evaluation.restoration import TASKS, compare_restoration
from unpersonal.metrics.auc import bootstrap_auc_ci, bootstrap_auc_gap_ci, roc_auc_per_class
from unpersonal.progress import console

SCHEMA = 1
# "synthetic-then-real": pretrained on the synthetic set, then fine-tuned on the real training
# set with the same settings (the strongest published use of synthetic chest X-rays).
TRAINING_SETS = ("real", "synthetic", "real+synthetic", "synthetic-then-real")
TRAINING_SET_TITLES = {"real": "real", "synthetic": "synthetic",
                       "real+synthetic": "real + synthetic",
                       "synthetic-then-real": "synthetic, then fine-tuned on real"}


class TrainClassifier(Protocol):
    """Trains a classifier on one set (images float [N, R, R], labels [N, C]) with a seed, from
    `init`'s weights when given, early-stopped on the real validation split: the evaluation's
    only use of a trainer."""

    def __call__(self, images: np.ndarray, labels: np.ndarray, seed: int, progress: str,
                 init: Classifier | None = None) -> Classifier: ...


def evaluate_set(dataset: CanonicalDataset, images: np.ndarray, labels: np.ndarray,
                 settings: EvaluateConfig, seed: int, embedder: Path, real_classifier: Path,
                 train_classifier: TrainClassifier, real_probs: np.ndarray | None = None,
                 split: str = "test") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All fidelity and utility figures of one candidate training set (images float [N, R, R]).

    Fidelity is measured in the space of the embedder in folder `embedder` (the audit's);
    `real_classifier` is the folder of the real-trained classifier of the first seed
    (fit-classifier's), the others come from `train_classifier`. Also used by the benchmarks on
    sets that are not released: the real training set itself, an unfiltered sample.
    `real_probs` [seeds, N_test, C], the real-trained classifiers' test probabilities of an
    earlier call, saves training them again. Returns the metrics and the test probabilities per
    training set ([seeds, N_test, C]) with the test labels.

    `split` is the held-out split the figures are measured on: "test" for what is reported,
    "val" for choosing a setting (benchmarks), so that the test split is used once per reported
    figure. The classifiers early-stop on the validation split either way; measured on it, every
    training set gets the same small optimism, so a comparison between settings stays fair.
    """
    console.print(f"evaluate: fidelity and diversity of {len(images):,} images")
    fidelity = fidelity_figures(dataset, images, settings, seed, embedder, split)
    console.print("evaluate: classification utility")
    classification, curves = classification_utility(
        dataset, images, labels, settings, seed, real_classifier, train_classifier, real_probs,
        split)
    utility: dict[str, Any] = {"classification": classification}
    if settings.restoration:
        utility["restoration"] = restoration_utility(dataset, images, settings, seed, split)
    return {"schema": SCHEMA, "synthetic_images": len(images), "measured_on": split,
            "fidelity": fidelity, "utility": utility}, curves


def fidelity_figures(dataset: CanonicalDataset, images: np.ndarray, settings: EvaluateConfig,
                     seed: int, embedder: Path, split: str = "test") -> dict[str, Any]:
    features = np.load(embedder / "features.npy")
    train, test = features[dataset.split == "train"], features[dataset.split == split]
    synthetic = load_embedder(embedder).embed(images)
    kid = {name: kernel_inception_distance(train, other, settings.kid_subsets,
                                           settings.kid_subset_size, seed)
           for name, other in (("synthetic", synthetic), ("test", test))}
    # The retrieval score grows with the number of queries: compare equal counts.
    queries = min(len(synthetic), len(test))
    rng = np.random.default_rng(seed)
    pick_synthetic = rng.choice(len(synthetic), queries, replace=False)
    pick_test = rng.choice(len(test), queries, replace=False)
    return {
        "feature_space": "audit embedder (unit-norm)", "reference": "real training images",
        "fd": frechet_distance(train, synthetic), "fd_real_test": frechet_distance(train, test),
        "kid": {"mean": kid["synthetic"][0], "std": kid["synthetic"][1]},
        "kid_real_test": {"mean": kid["test"][0], "std": kid["test"][1]},
        "prdc": prdc(train, synthetic, settings.prdc_k),
        "prdc_real_test": prdc(train, test, settings.prdc_k),
        "vendi": {"synthetic": vendi_score(synthetic), "real_train": vendi_score(train),
                  "real_test": vendi_score(test)},
        "retrieval": {"synthetic": retrieval_score(train, synthetic[pick_synthetic]),
                      "real_test": retrieval_score(train, test[pick_test]),
                      "queries": int(queries)},
    }


def classification_utility(dataset: CanonicalDataset, images: np.ndarray, labels: np.ndarray,
                           settings: EvaluateConfig, first_seed: int, real_classifier: Path,
                           train_classifier: TrainClassifier,
                           real_probs: np.ndarray | None = None, split: str = "test"
                           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train on real, synthetic and both, and pretrain on synthetic then fine-tune on real; test
    each on the real held-out `split` (`seeds` times).

    Seed 0's real classifier is fit-classifier's (same settings, same seed); the others are
    trained here. Validation (early stopping) is on the real validation split for all of them.
    """
    train, test = dataset.subset("train"), dataset.subset(split)
    real = (train.images_float(), train.labels)
    sets = {"real": real, "synthetic": (images, labels)}
    if settings.real_plus_synthetic:
        sets["real+synthetic"] = (np.concatenate([real[0], images]),
                                  np.concatenate([real[1], labels]))
    if settings.pretrain_finetune:
        sets["synthetic-then-real"] = real
    test_images = test.images_float()
    probs: dict[str, list[np.ndarray]] = {name: [] for name in sets}
    for s in range(settings.classifier_seeds):
        seed = first_seed + s
        trained: dict[str, Classifier] = {}
        for name, (x, y) in sets.items():
            if name == "real" and real_probs is not None:
                probs[name].append(real_probs[s])
                continue
            if name == "real" and s == 0:
                classifier = load_classifier(real_classifier)
            else:
                classifier = train_classifier(x, y, seed, f"classifier on {name} (seed {seed})",
                                              init=trained.get("synthetic")
                                              if name == "synthetic-then-real" else None)
            trained[name] = classifier
            probs[name].append(classifier.predict_proba(test_images))
    figures: dict[str, Any] = {"seeds": settings.classifier_seeds, "test_images": len(test),
                               "bootstrap_unit": "patient"}
    for name, stack in probs.items():
        figures[name] = _auc_summary(test, np.stack(stack), settings.bootstrap, first_seed)
    for name in sets:
        if name == "real":
            continue
        suffix = "" if name == "synthetic" else f"_{name}"
        figures[f"gap_pp{suffix}"] = 100 * (figures[name]["mean"] - figures["real"]["mean"])
        low, high = bootstrap_auc_gap_ci(test.labels, np.stack(probs[name]),
                                         np.stack(probs["real"]), test.label_kind,
                                         settings.bootstrap, first_seed, groups=test.patient_id)
        figures[f"gap_pp{suffix}_ci95"] = [100 * low, 100 * high]
    return figures, {name: np.stack(stack) for name, stack in probs.items()} | {
        "labels": test.labels}


def _auc_summary(test: CanonicalDataset, stack: np.ndarray, resamples: int, seed: int
                 ) -> dict[str, Any]:
    per_seed = [roc_auc_per_class(test.labels, probs, test.label_kind, test.label_names)
                for probs in stack]
    means = [scores["mean"] for scores in per_seed]
    per_class = {name: float(np.mean([scores["per_class"][name] for scores in per_seed]))
                 for name in per_seed[0]["per_class"]}
    low, high = bootstrap_auc_ci(test.labels, stack, test.label_kind, resamples, seed,
                                 groups=test.patient_id)
    return {"mean": float(np.mean(means)), "std_over_seeds": float(np.std(means)),
            "per_seed": [float(m) for m in means], "ci95": [low, high], "per_class": per_class}


def restoration_utility(dataset: CanonicalDataset, images: np.ndarray, settings: EvaluateConfig,
                        seed: int, split: str = "test") -> dict[str, Any]:
    train, test = dataset.subset("train"), dataset.subset(split)
    out = {}
    for task in TASKS:
        console.print(f"evaluate: restoration utility ({task})")
        out[task] = compare_restoration(
            train.images_float(), images, test.images_float(), task,
            steps=settings.restoration_steps, batch_size=settings.restoration_batch,
            seed=seed, noise_sigma=settings.noise_sigma, width=settings.restoration_width,
            resamples=settings.bootstrap, test_patients=test.patient_id,
            margins={"psnr": settings.equivalence_psnr_db, "ssim": settings.equivalence_ssim})
    return out


def roc_plot(curves: dict[str, np.ndarray], label_names: list[str]) -> bytes:
    """Test ROC curves per class, one line per training set: the utility at a glance."""
    plt = pyplot()
    from sklearn.metrics import roc_curve

    labels = curves["labels"]
    columns = range(labels.shape[1])
    figure, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 4), squeeze=False)
    for column, axis in zip(columns, axes[0]):
        truth = labels[:, column]
        if truth.min() == truth.max():
            axis.set_title(f"{label_names[column]}: one class only")
            continue
        for name in TRAINING_SETS:
            if name in curves:
                fpr, tpr, _ = roc_curve(truth, curves[name][0, :, column])  # first seed
                axis.plot(fpr, tpr, label=f"trained on {name}")
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        axis.set(title=label_names[column], xlabel="false positive rate",
                 ylabel="true positive rate", aspect="equal")
        axis.legend(loc="lower right", fontsize=8)
    return png_bytes(figure)
