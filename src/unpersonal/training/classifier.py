"""`unpersonal fit-classifier`: the downstream classifier, and the one trainer behind all its uses.

The same trainer serves "train on real, test on real" (the baseline this stage publishes), "train
on synthetic, test on real" (the utility test) and the label-consistency score during sampling
(the published method's label-consistency step), so `fit_classifier` takes plain arrays and
knows nothing of run directories. A small ResNet with a linear head; AdamW with a cosine
schedule; the weights of the epoch with the best validation ROC-AUC are kept, and training stops
after `patience` epochs without a better one.

    run/.work/fit-classifier/checkpoint.pt   resumable state (weights, AdamW, step, best so far)
    run/fit-classifier/                      published when training ends:
        classifier.safetensors   the weights of the best validation epoch
        classifier.json          architecture, labels, training summary, val and test ROC-AUC
        training_log.csv         epoch, losses, validation AUC, learning rate, elapsed seconds
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from unpersonal.artifacts.classifier import Classifier
from unpersonal.config import ClassifierConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError
from unpersonal.metrics.auc import bootstrap_auc_ci, roc_auc_per_class
from unpersonal.models.classifier import ClassifierNet
from unpersonal.models.edm import count_parameters
from unpersonal.rundir import write_atomic
from unpersonal.torch_utils import pick_device
from unpersonal.training.common import cosine_lr, cpu_state, descend
from unpersonal.training.loop import BestSoFar, SeededBatches, TrainingLoop, write_log
from unpersonal.training.views import shift_and_jitter

LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_auc", "lr", "elapsed_s")
BOOTSTRAP_RESAMPLES = 1000
LABEL_KINDS = ("binary", "multiclass", "multilabel")


def classification_loss(logits: Tensor, targets: Tensor, label_kind: str) -> Tensor:
    """Cross-entropy for one-hot multi-class targets, binary cross-entropy per column otherwise.

    No class weighting (no pos_weight, no resampling): the figure that matters is ROC-AUC, which
    depends only on how images are ranked, and weighting would move the probabilities away from
    the label frequencies without improving the ranking much. Unweighted, the probabilities stay
    calibrated to the training labels, which the label-consistency score during sampling reads.
    """
    if label_kind == "multiclass":
        return F.cross_entropy(logits, targets.argmax(dim=1))
    return F.binary_cross_entropy_with_logits(logits, targets)


def architecture(classifier: Classifier) -> dict[str, Any]:
    """classifier.json's "architecture": what `load_classifier` rebuilds the network from."""
    return {"encoder": "ResNetEncoder", "in_channels": 1, "width": classifier.net.width,
            "blocks_per_stage": 1, "outputs": len(classifier.label_names),
            "input": "grey [B, 1, R, R] in [0, 1]",
            **({} if classifier.net.input_size is None
               else {"input_size": classifier.net.input_size}),
            "parameters": count_parameters(classifier.net)}


def save_classifier(folder: Path, classifier: Classifier, extra: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """classifier.safetensors + classifier.json (architecture, labels, history, `extra`);
    returns what classifier.json holds."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(cpu_state(classifier.net), str(folder / "classifier.safetensors"))
    meta = {"architecture": architecture(classifier), "resolution": classifier.resolution,
            "label_kind": classifier.label_kind, "label_names": classifier.label_names,
            "training": {key: value for key, value in classifier.history.items() if key != "log"},
            **(extra or {})}
    write_atomic(folder / "classifier.json", json.dumps(meta, indent=2) + "\n")
    return meta


def fit_classifier(images: np.ndarray, labels: np.ndarray, label_kind: str,
                   settings: ClassifierConfig, seed: int, val_images: np.ndarray | None = None,
                   val_labels: np.ndarray | None = None,
                   progress: str | None = "training classifier",
                   label_names: list[str] | None = None,
                   checkpoint: Path | None = None, stage: str = "fit-classifier",
                   init: Classifier | None = None) -> Classifier:
    """Train a classifier on any arrays: images float [N, R, R] in [0, 1], labels uint8 [N, C].

    The initial weights come from `seed` and every random draw of step t (batch, augmentation)
    from (seed, t), so the same inputs and seed give the same weights (on the CPU; GPU kernels
    may differ in the last bits), and a run resumed from `checkpoint` ends where an uninterrupted
    one would (`stage` names it in the messages). Without validation arrays there is no early
    stopping and the last epoch's weights are kept. `progress` is the bar's description (None:
    no bar). `init`, a classifier of the same settings and labels, gives the starting weights
    instead of the seed (fine-tuning: a classifier pretrained on synthetic images, then trained
    on real ones with the same schedule).
    """
    names = label_names or [f"class_{c}" for c in range(np.asarray(labels).shape[-1])]
    train_x, train_y = _training_tensors(images, labels, label_kind, names, "training")
    validation = _validation(val_images, val_labels, label_kind, names, train_x)
    device = pick_device()
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, caller's RNG left alone
        torch.manual_seed(seed)
        net = ClassifierNet(settings.width, train_y.shape[1], settings.input_size).to(device)
    if init is not None:
        net.load_state_dict(init.net.state_dict())
    classifier = Classifier(net, label_kind, names, int(train_x.shape[-1]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    n, batch = len(train_x), settings.batch_size
    steps_per_epoch = math.ceil(n / batch)
    total_steps = settings.epochs * steps_per_epoch
    best = BestSoFar()  # by validation ROC-AUC, per epoch
    loop = TrainingLoop(stage, checkpoint, total_steps, checkpoint_every=steps_per_epoch,
                        max_minutes=settings.max_minutes, log_every=None,
                        epoch_steps=steps_per_epoch)
    loop.resume(model=net, optimizer=optimizer, best=best)
    batches = SeededBatches(seed, n, batch, device)
    net.train()
    with loop.running(progress, print_every=steps_per_epoch):
        for step in loop.steps(stop=lambda: best.stale >= settings.patience):
            indices, generator = batches.draw(step)
            x = shift_and_jitter(train_x[indices].to(device), settings.augment_shift,
                                 settings.augment_intensity, generator, (0.0, 1.0))
            loss = classification_loss(net(x), train_y[indices].to(device), label_kind)
            lr = cosine_lr(step, total_steps, settings.lr)
            descend(optimizer, loss, lr)
            loop.record(loss.item())
            if (step + 1) % steps_per_epoch == 0:
                _end_epoch(loop, best, classifier, lr, validation)
        if loop.window:  # stopped by the clock within an epoch (its last step's rate)
            _end_epoch(loop, best, classifier, cosine_lr(loop.step - 1, total_steps, settings.lr),
                       validation)
    if best.weights is not None:
        net.load_state_dict(best.weights)
    net.eval().requires_grad_(False)
    stopped_by = ("epochs" if loop.step >= total_steps else
                  "max_minutes" if loop.timed_out else "patience")
    classifier.history = {
        "images": n, "seed": seed, "epochs_planned": settings.epochs,
        "epochs_run": len(loop.log), "best_epoch": best.at, "stopped_by": stopped_by,
        "val_auc": _number_or_none(loop.log[best.at - 1]["val_auc"]),
        "seconds": round(loop.elapsed(), 1), "log": loop.log}
    return classifier


def _validation(images: np.ndarray | None, labels: np.ndarray | None, label_kind: str,
                names: list[str], train_x: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """The checked validation arrays, or None when there are none (no early stopping)."""
    if images is None or len(images) == 0:
        return None
    _training_tensors(images, labels, label_kind, names, "validation")
    if np.asarray(images).shape[1:] != tuple(train_x.shape[2:]):
        raise UserError(f"validation images are {list(np.asarray(images).shape[1:])} px, "
                        f"training images {list(train_x.shape[2:])}")
    return images, labels


def _end_epoch(loop: TrainingLoop, best: BestSoFar, classifier: Classifier, lr: float,
               validation: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Log the epoch and keep the weights if validation improved (`best.stale` counts the
    epochs since it last did, for early stopping).

    The validation score is the mean ROC-AUC; when no class has both positives and negatives in
    the validation split (tiny datasets) it falls back to minus the validation loss.
    """
    epoch = len(loop.log) + 1  # one row per epoch, the last one possibly cut short
    entry = {"epoch": epoch, "train_loss": loop.mean_loss(), "val_loss": math.nan,
             "val_auc": math.nan, "lr": lr, "elapsed_s": loop.elapsed()}
    if validation is None:  # without validation, the latest epoch is the one kept
        best.keep(epoch, classifier.net)
    else:
        val_images, val_labels = validation
        classifier.net.eval()
        probs = classifier.predict_proba(val_images)
        classifier.net.train()
        entry["val_loss"] = _loss_of(probs, val_labels, classifier.label_kind)
        auc = roc_auc_per_class(val_labels, probs, classifier.label_kind,
                                classifier.label_names)["mean"]
        entry["val_auc"] = math.nan if auc is None else auc
        best.offer(-entry["val_loss"] if auc is None else auc, epoch, classifier.net)
    loop.append_row(entry)


def _number_or_none(value: float) -> float | None:
    """JSON has no NaN: an unmeasured figure is written as null."""
    return None if math.isnan(value) else value


def _loss_of(probs: np.ndarray, labels: np.ndarray, label_kind: str) -> float:
    """The training loss, computed from probabilities (clipped, so a confident miss is finite)."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    if label_kind == "multiclass":
        return float(-np.mean(np.log(p[np.arange(len(y)), y.argmax(axis=1)])))
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _training_tensors(images: np.ndarray, labels: np.ndarray | None, label_kind: str,
                      names: list[str], role: str) -> tuple[Tensor, Tensor]:
    """Checked [N, 1, R, R] float images and [N, C] float targets; a UserError names the problem."""
    if label_kind not in LABEL_KINDS:
        raise UserError(f"label kind {label_kind!r} is not one of {', '.join(LABEL_KINDS)}")
    images = np.asarray(images)
    labels = None if labels is None else np.asarray(labels)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise UserError(f"{role} images must be [N, R, R], got shape {list(images.shape)}")
    if labels is None or labels.ndim != 2 or len(labels) != len(images):
        shape = None if labels is None else list(labels.shape)
        raise UserError(f"{role} labels must be [N, C] with N = {len(images)}, got {shape}")
    if labels.shape[1] != len(names):
        raise UserError(f"{role} labels have {labels.shape[1]} columns for {len(names)} names")
    if not np.isin(labels, (0, 1)).all():
        raise UserError(f"{role} labels must be 0/1")
    if label_kind == "binary" and labels.shape[1] != 1:
        raise UserError(f"binary {role} labels have one column, got {labels.shape[1]}")
    if label_kind == "multiclass" and not (labels.sum(axis=1) == 1).all():
        raise UserError(f"multiclass {role} labels must be one-hot (one 1 per row)")
    if role == "training" and len(images) < 2:
        raise UserError(f"{len(images)} training image(s): a classifier needs at least 2")
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise UserError(f"{role} images must be finite and in [0, 1]")
    return (torch.from_numpy(np.ascontiguousarray(images, np.float32)).unsqueeze(1),
            torch.from_numpy(labels.astype(np.float32)))


# ---------------------------------------------------------------- the stage


def score_split(classifier: Classifier, split: CanonicalDataset, seed: int) -> dict[str, Any]:
    """ROC-AUC per class and mean on one split, with a patient-level bootstrap 95% interval."""
    if len(split) == 0:
        return {"images": 0, "per_class": {}, "mean": None, "ci95": None,
                "skipped": list(classifier.label_names)}
    probs = classifier.predict_proba(split.images_float())
    scores = roc_auc_per_class(split.labels, probs, split.label_kind, split.label_names)
    ci = None
    if scores["mean"] is not None:
        ci = list(bootstrap_auc_ci(split.labels, probs, split.label_kind, BOOTSTRAP_RESAMPLES,
                                   seed, groups=split.patient_id))
    return {"images": len(split), **scores, "ci95": ci,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "unit": "patient"}}


def publish(folder: Path, classifier: Classifier, scores: dict[str, Any]) -> dict[str, Any]:
    """The classifier with its scores, and its training log; returns classifier.json's content."""
    meta = save_classifier(folder, classifier, extra=scores)
    write_log(folder / "training_log.csv", classifier.history["log"], LOG_FIELDS)
    return meta
