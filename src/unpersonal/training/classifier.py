"""`unpersonal fit-classifier`: the downstream classifier, and the one trainer behind all its uses.

The same trainer serves "train on real, test on real" (the baseline this stage publishes), "train
on synthetic, test on real" (the utility test) and the label-consistency score during sampling
(DESIGN.md sections 4-6), so `fit_classifier` takes plain arrays and knows nothing of run
directories. A small ResNet with a linear head; AdamW with a cosine schedule; the weights of the
epoch with the best validation ROC-AUC are kept, and training stops after `patience` epochs
without a better one.

    run/.work/fit-classifier/checkpoint.pt   resumable state (weights, AdamW, step, best so far)
    run/fit-classifier/                      published when training ends:
        classifier.safetensors   the weights of the best validation epoch
        classifier.json          architecture, labels, training summary, val and test ROC-AUC
        training_log.csv         epoch, losses, validation AUC, learning rate, elapsed seconds
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unpersonal.config import ClassifierConfig, Config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.errors import Interrupted, UserError
from unpersonal.metrics.auc import bootstrap_auc_ci, roc_auc_per_class
from unpersonal.models.edm import count_parameters
from unpersonal.models.encoder import ResNetEncoder
from unpersonal.progress import LiveBar, console
from unpersonal.rundir import RunDir, sha256_json, write_atomic
from unpersonal.torch_utils import batch_indices, pick_device, step_generator
from unpersonal.training.common import cpu_state, load_state, out_of_time, save_state

STAGE = "fit-classifier"
LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_auc", "lr", "elapsed_s")
PREDICT_BATCH = 512
BOOTSTRAP_RESAMPLES = 1000
LABEL_KINDS = ("binary", "multiclass", "multilabel")


class ClassifierNet(nn.Module):
    """ResNetEncoder + a linear head: images [B, 1, R, R] in [0, 1] -> logits [B, C]."""

    def __init__(self, width: int, outputs: int) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(in_channels=1, width=width)
        self.head = nn.Linear(self.encoder.out_features, outputs)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images * 2 - 1))


def probabilities(logits: Tensor, label_kind: str) -> Tensor:
    """Softmax over the classes when exactly one holds, else an independent sigmoid per column."""
    return logits.softmax(dim=1) if label_kind == "multiclass" else logits.sigmoid()


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


@dataclass
class Classifier:
    """A trained classifier, ready to score images; `history` says how it was trained."""

    net: ClassifierNet
    label_kind: str
    label_names: list[str]
    resolution: int
    width: int
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """images float [N, R, R] in [0, 1] -> probabilities [N, C] (float32)."""
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.resolution, self.resolution):
            raise UserError(f"the classifier scores [N, {self.resolution}, {self.resolution}] "
                            f"images, got shape {list(images.shape)}")
        self.net.eval()
        out = [probabilities(self.net(_as_batch(images[start:start + PREDICT_BATCH],
                                                self.device)), self.label_kind).cpu()
               for start in range(0, len(images), PREDICT_BATCH)]
        if not out:
            return np.zeros((0, len(self.label_names)), np.float32)
        return torch.cat(out).numpy()

    def architecture(self) -> dict[str, Any]:
        return {"encoder": "ResNetEncoder", "in_channels": 1, "width": self.width,
                "blocks_per_stage": 1, "outputs": len(self.label_names),
                "input": "grey [B, 1, R, R] in [0, 1]", "parameters": count_parameters(self.net)}

    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        """classifier.safetensors + classifier.json (architecture, labels, history, `extra`)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(cpu_state(self.net), str(folder / "classifier.safetensors"))
        meta = {"architecture": self.architecture(), "resolution": self.resolution,
                "label_kind": self.label_kind, "label_names": self.label_names,
                "training": {key: value for key, value in self.history.items() if key != "log"},
                **(extra or {})}
        write_atomic(folder / "classifier.json", json.dumps(meta, indent=2) + "\n")


def load_classifier(folder: Path) -> Classifier:
    """A saved classifier in eval mode, rebuilt from classifier.json alone (no config needed)."""
    meta = json.loads((folder / "classifier.json").read_text())
    architecture = meta["architecture"]
    net = ClassifierNet(architecture["width"], architecture["outputs"])
    net.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    net.to(pick_device()).eval().requires_grad_(False)
    return Classifier(net, meta["label_kind"], list(meta["label_names"]), int(meta["resolution"]),
                      int(architecture["width"]), meta.get("training", {}))


def _as_batch(images: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1).to(device)


def augment(images: Tensor, settings: ClassifierConfig, generator: torch.Generator) -> Tensor:
    """Whole-pixel shifts (edge pixels repeated, never wrapped), then contrast/brightness jitter.

    Light on purpose: a finding can be a small patch near the edge, and a heavy crop or rotation
    could move it out of the image while the label stays. No flips: anatomy is lateral.
    """
    batch, size, device = len(images), images.shape[-1], images.device
    if settings.augment_shift:
        s = settings.augment_shift
        padded = F.pad(images, (s, s, s, s), mode="replicate")
        offsets = torch.randint(0, 2 * s + 1, (batch, 2), generator=generator, device=device)
        pixels = torch.arange(size, device=device)
        rows = (offsets[:, 0, None] + pixels)[:, :, None]  # [B, R, 1]
        cols = (offsets[:, 1, None] + pixels)[:, None, :]  # [B, 1, R]
        images = padded[torch.arange(batch, device=device)[:, None, None], 0, rows, cols]
        images = images.unsqueeze(1)
    if settings.augment_intensity:
        a = settings.augment_intensity
        contrast = 1 + a * (2 * torch.rand(batch, 1, 1, 1, generator=generator, device=device) - 1)
        brightness = a * (2 * torch.rand(batch, 1, 1, 1, generator=generator, device=device) - 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean + brightness).clamp(0, 1)
    return images


def cosine_lr(step: int, total_steps: int, peak: float) -> float:
    """Cosine decay from `peak` at step 0 to 0 at `total_steps`."""
    return peak * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


@dataclass
class _Progress:
    """Everything the loop carries from step to step; the checkpoint is this plus the weights."""

    step: int = 0
    log: list[dict[str, float]] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_weights: dict[str, Tensor] | None = None
    stale_epochs: int = 0
    stopped_by: str | None = None
    elapsed_s: float = 0.0


def fit_classifier(images: np.ndarray, labels: np.ndarray, label_kind: str,
                   settings: ClassifierConfig, seed: int, val_images: np.ndarray | None = None,
                   val_labels: np.ndarray | None = None,
                   progress: str | None = "training classifier",
                   label_names: list[str] | None = None,
                   checkpoint: Path | None = None) -> Classifier:
    """Train a classifier on any arrays: images float [N, R, R] in [0, 1], labels uint8 [N, C].

    The initial weights come from `seed` and every random draw of step t (batch, augmentation)
    from (seed, t), so the same inputs and seed give the same weights (on the CPU; GPU kernels
    may differ in the last bits), and a run resumed from `checkpoint` ends where an uninterrupted
    one would. Without validation arrays there is no early stopping and the last epoch's weights
    are kept. `progress` is the bar's description (None: no bar).
    """
    names = label_names or [f"class_{c}" for c in range(np.asarray(labels).shape[-1])]
    train_x, train_y = _training_tensors(images, labels, label_kind, names, "training")
    has_val = val_images is not None and len(val_images) > 0
    if has_val:
        _training_tensors(val_images, val_labels, label_kind, names, "validation")
        if np.asarray(val_images).shape[1:] != tuple(train_x.shape[2:]):
            raise UserError(f"validation images are {list(np.asarray(val_images).shape[1:])} px, "
                            f"training images {list(train_x.shape[2:])}")
    device = pick_device()
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, caller's RNG left alone
        torch.manual_seed(seed)
        net = ClassifierNet(settings.width, train_y.shape[1]).to(device)
    classifier = Classifier(net, label_kind, names, int(train_x.shape[-1]), settings.width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    n, batch = len(train_x), settings.batch_size
    steps_per_epoch = math.ceil(n / batch)
    total_steps = settings.epochs * steps_per_epoch
    state = load_state(checkpoint) if checkpoint is not None else None
    run = _Progress()
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run = _Progress(**state["progress"])
        console.print(f"{progress or 'classifier'}: resuming at epoch "
                      f"{run.step // steps_per_epoch + 1} of {settings.epochs}")
    started = time.perf_counter()
    elapsed_before = run.elapsed_s

    def save() -> None:
        if checkpoint is not None:
            run.elapsed_s = elapsed_before + time.perf_counter() - started
            save_state(checkpoint, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                    "progress": vars(run)})

    net.train()
    try:
        with LiveBar(progress or "", total_steps, start=run.step, log_every=steps_per_epoch,
                     enabled=progress is not None) as bar:
            while run.stopped_by is None:
                lr = cosine_lr(run.step, total_steps, settings.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                indices = batch_indices(seed, run.step, 0, batch, 1, n)
                generator = step_generator(seed, run.step, device)
                x = augment(train_x[indices].to(device), settings, generator)
                loss = classification_loss(net(x), train_y[indices].to(device), label_kind)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                run.step += 1
                run.epoch_losses.append(loss.item())
                epoch_loss = float(np.mean(run.epoch_losses))
                timed_out = out_of_time(settings.max_minutes, elapsed_before, started)
                if run.step % steps_per_epoch == 0 or run.step == total_steps or timed_out:
                    epoch = math.ceil(run.step / steps_per_epoch)
                    _end_epoch(run, classifier, epoch, lr, val_images if has_val else None,
                               val_labels, settings, elapsed_before + time.perf_counter() - started)
                    if run.step >= total_steps:
                        run.stopped_by = "epochs"
                    elif timed_out:
                        run.stopped_by = "max_minutes"
                    save()
                bar.update(1, loss=epoch_loss,
                           val_auc=run.log[-1]["val_auc"] if run.log else math.nan)
    except KeyboardInterrupt:
        if checkpoint is None:
            raise
        save()
        raise Interrupted(f"classifier training interrupted at step {run.step} of {total_steps} "
                          f"(epoch {run.step // steps_per_epoch + 1} of {settings.epochs}); "
                          "state saved, rerun the same command to resume") from None
    if run.best_weights is not None:
        net.load_state_dict(run.best_weights)
    net.eval().requires_grad_(False)
    classifier.history = {
        "images": n, "seed": seed, "epochs_planned": settings.epochs,
        "epochs_run": len(run.log), "best_epoch": run.best_epoch, "stopped_by": run.stopped_by,
        "val_auc": _number_or_none(run.log[run.best_epoch - 1]["val_auc"]),
        "seconds": round(elapsed_before + time.perf_counter() - started, 1), "log": run.log}
    return classifier


def _end_epoch(run: _Progress, classifier: Classifier, epoch: int, lr: float,
               val_images: np.ndarray | None, val_labels: np.ndarray | None,
               settings: ClassifierConfig, elapsed_s: float) -> None:
    """Log the epoch, keep the weights if validation improved, decide on early stopping.

    The validation score is the mean ROC-AUC; when no class has both positives and negatives in
    the validation split (tiny datasets) it falls back to minus the validation loss.
    """
    entry = {"epoch": epoch, "train_loss": float(np.mean(run.epoch_losses)),
             "val_loss": math.nan, "val_auc": math.nan, "lr": lr, "elapsed_s": elapsed_s}
    run.epoch_losses = []
    improved = val_images is None  # without validation, the latest epoch is the one kept
    if val_images is not None:
        probs = classifier.predict_proba(val_images)
        classifier.net.train()
        entry["val_loss"] = _loss_of(probs, val_labels, classifier.label_kind)
        auc = roc_auc_per_class(val_labels, probs, classifier.label_kind,
                                classifier.label_names)["mean"]
        entry["val_auc"] = math.nan if auc is None else auc
        score = -entry["val_loss"] if auc is None else auc
        improved = score > run.best_score
        if improved:
            run.best_score = score
    run.log.append(entry)
    if improved:
        run.best_epoch, run.best_weights, run.stale_epochs = epoch, cpu_state(classifier.net), 0
    else:
        run.stale_epochs += 1
        if run.stale_epochs >= settings.patience:
            run.stopped_by = "patience"


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


def stage_key(config: Config, run: RunDir) -> str:
    return sha256_json({"config": config.section_dump(("classifier", "data")),
                        "inputs": {"prepare": run.require("prepare")}})


def run_fit_classifier(config: Config, run: RunDir, force: bool = False) -> bool:
    """Train on the real train split, stop early on val, score on test; False when skipped."""
    key = stage_key(config, run)
    if run.up_to_date(STAGE, key, force):
        return False
    work = run.resumable_work_dir(STAGE, key, force)
    dataset = load_canonical(run.stage_path("prepare"))
    train, val, test = (dataset.subset(split) for split in ("train", "val", "test"))
    if len(train) < 2:
        raise UserError(f"the training split has {len(train)} image(s): nothing to train the "
                        "classifier on")
    classifier = fit_classifier(
        train.images_float(), train.labels, dataset.label_kind, config.classifier, config.seed,
        val_images=val.images_float() if len(val) else None,
        val_labels=val.labels if len(val) else None, label_names=dataset.label_names,
        checkpoint=work / "checkpoint.pt")
    scores = {"val": score_split(classifier, val, config.seed),
              "test": score_split(classifier, test, config.seed)}
    with run.build_stage(STAGE, key, config) as folder:
        publish(folder, classifier, scores)
    run.clear_work(STAGE)
    return True


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


def publish(folder: Path, classifier: Classifier, scores: dict[str, Any]) -> None:
    classifier.save(folder, extra=scores)
    with open(folder / "training_log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(classifier.history["log"])
