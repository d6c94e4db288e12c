"""`unpersonal fit-embedder`: a self-supervised image encoder, or the user's own extractor.

The embedder gives every image a unit-norm feature: the space in which pseudo-conditioning,
the fidelity metrics and the distance safeguard work. It learns from the training split alone,
without labels, by making two random views of one image agree (SimCLR's NT-Xent, or VICReg):
no ImageNet weights exist offline, and features of the user's own modality suit it better.

    run/.work/fit-embedder/checkpoint.pt   resumable state (weights, projector, AdamW, step, log)
    run/fit-embedder/                      published when training ends:
        embedder.safetensors  encoder + linear head, architecture in its metadata (format below)
        embedder.json         source, architecture, method, dim, steps, seconds, linear probe
        features.npy          float32 [N_all, D]: the unit-norm feature of every canonical image,
                              in canonical row order (all splits)
        training_log.csv      step, loss, learning rate, images/s, elapsed seconds

With `embedder.extractor` set nothing is trained: the file is checked, copied into the stage
folder (so `load_embedder` can reload it) and used for features.npy and the probe.

Weights file format (`embedder.safetensors`, also accepted as an extractor):
    tensors   the state dict of `FeatureNet`: "encoder.*" (a `ResNetEncoder`, batch-norm running
              statistics included) and "head.weight" [D, 8 * width], "head.bias" [D]
    metadata  one key, "unpersonal-embedder-v1" = JSON {"in_channels": 1, "width": w,
              "blocks_per_stage": b, "dim": D} (one key, as safetensors writes several in no
              fixed order and the file's bytes should be reproducible)
A TorchScript extractor is any scripted or traced module mapping float [B, 1, R, R] images in
[0, 1] to [B, D] features; its output is scaled to unit norm here.

As in fit-diffusion, every random draw of step t (which images, which views) comes from a
generator seeded by (seed, t), so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from unpersonal.artifacts.embedder import WEIGHTS_FORMAT, Embedder, load_network
from unpersonal.config import EmbedderConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError, first_line
from unpersonal.metrics.probe import linear_probe_auc
from unpersonal.models.embedder import FeatureNet
from unpersonal.models.encoder import unit_norm
from unpersonal.rundir import sha256_file, write_atomic
from unpersonal.training.common import cosine_lr, cpu_state, descend
from unpersonal.training.loop import SeededBatches, TrainingLoop, write_log
from unpersonal.training.views import random_views

LOG_FIELDS = ("step", "loss", "lr", "images_per_s", "elapsed_s")
WARMUP_SHARE = 0.05  # of the steps: a short linear warm-up before the cosine decay
VICREG_WEIGHTS = (25.0, 25.0, 1.0)  # invariance, variance, covariance (Bardes et al. 2022)


def projector(dim: int) -> nn.Sequential:
    """The self-supervised head: a 3-layer MLP of width 4 * dim, used only while training.

    Three layers as in SimCLR v2 and VICReg's expander, scaled down for CPUs; one head for both
    methods keeps them comparable.
    """
    hidden = 4 * dim
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden))


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss: each view must pick its partner out of the other 2B - 2 views.

    Cross-entropy over cosine similarities / temperature, the self-similarity masked out.
    """
    z = unit_norm(torch.cat([z_a, z_b]))
    n = len(z_a)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -math.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def vicreg(z_a: Tensor, z_b: Tensor) -> Tensor:
    """VICReg (Bardes et al. 2022, eq. 6): lambda s + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')].

    s: mean squared distance of paired views (invariance); v: hinge keeping every dimension's
    standard deviation over the batch at least 1 (no collapse); c: squared off-diagonal
    covariances / D (dimensions carry different information).
    """
    lam, mu, nu = VICREG_WEIGHTS
    return (lam * F.mse_loss(z_a, z_b) + mu * (_variance(z_a) + _variance(z_b))
            + nu * (_covariance(z_a) + _covariance(z_b)))


def _variance(z: Tensor) -> Tensor:
    return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()


def _covariance(z: Tensor) -> Tensor:
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = (z.T @ z) / (n - 1)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    return off_diagonal.pow(2).sum() / d


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class TrainingResult:
    network: FeatureNet
    log: list[dict[str, float]]
    steps_done: int
    seconds: float


def train(settings: EmbedderConfig, seed: int, train_split: CanonicalDataset, checkpoint: Path,
          device: torch.device, stage: str) -> TrainingResult:
    """The loop. Saves `checkpoint` every `checkpoint_every` steps and on Ctrl-C / SIGTERM;
    `stage` is the name messages give it (fit-embedder, or the audit's audit-embedder)."""
    n = len(train_split)
    if n < 2:
        raise UserError(f"the training split has {n} image(s): self-supervised training of the "
                        "embedder needs at least 2")
    # A batch larger than the split would hold copies of one image, negatives of each other.
    batch = min(settings.batch_size, n)
    torch.manual_seed(seed)
    network = FeatureNet(settings.width, settings.dim, input_size=settings.input_size).to(device)
    model = nn.ModuleDict({"features": network, "projector": projector(settings.dim)}).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no weight decay on norms, biases
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    loop = TrainingLoop(stage, checkpoint, settings.steps,
                        checkpoint_every=settings.checkpoint_every,
                        max_minutes=settings.max_minutes, images_per_step=batch)
    loop.resume(model=model, optimizer=optimizer)
    batches = SeededBatches(seed, n, batch, device)
    warmup = max(1, round(WARMUP_SHARE * settings.steps))
    model.train()
    with loop.running(f"training embedder ({settings.method})"):
        for step in loop.steps():
            indices, generator = batches.draw(step)
            x = torch.from_numpy(_unit_range(train_split, indices.numpy())).to(device)
            view_a = random_views(x, settings.augment, generator)
            view_b = random_views(x, settings.augment, generator)
            z_a, z_b = model["projector"](network(torch.cat([view_a, view_b]))).chunk(2)
            if settings.method == "simclr":
                loss = nt_xent(z_a, z_b, settings.temperature)
            else:
                loss = vicreg(z_a, z_b)
            lr = cosine_lr(step, settings.steps, settings.lr, warmup)
            descend(optimizer, loss, lr)
            loop.record(loss.item(), lr=lr)
    return TrainingResult(network.eval(), loop.log, loop.step, loop.elapsed())


def trained_meta(settings: EmbedderConfig, result: TrainingResult) -> dict[str, Any]:
    return {"source": "trained", "weights": "embedder.safetensors", "weights_format": "safetensors",
            "architecture": result.network.architecture, "method": settings.method,
            "temperature": settings.temperature if settings.method == "simclr" else None,
            "steps_planned": settings.steps, "steps_done": result.steps_done,
            "seconds": round(result.seconds, 1),
            "parameters": sum(p.numel() for p in result.network.parameters())}


def _unit_range(dataset: CanonicalDataset, rows: np.ndarray | slice) -> np.ndarray:
    """Some stored images as float32 [B, 1, R, R] in [0, 1], converting only those rows.

    The same arithmetic as `CanonicalDataset.images_float`, so features match to the bit.
    """
    return (dataset.images[rows].astype(np.float32) / float((1 << dataset.bit_depth) - 1))[:, None]


def embed_dataset(embedder: Embedder, dataset: CanonicalDataset, chunk: int = 4096
                  ) -> np.ndarray:
    """Unit-norm features of every image, in row order, never holding all pixels as floats."""
    parts = [embedder.embed(_unit_range(dataset, slice(start, start + chunk))[:, 0])
             for start in range(0, len(dataset), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)


def probe_features(features: np.ndarray, dataset: CanonicalDataset) -> dict[str, Any]:
    """The linear probe of these features: fitted on the training split, scored on the test."""
    train, test = dataset.split == "train", dataset.split == "test"
    return linear_probe_auc(features[train], dataset.labels[train], features[test],
                            dataset.labels[test], dataset.label_kind, dataset.label_names)


def publish(folder: Path, embedder: Embedder, meta: dict[str, Any], features: np.ndarray,
            log: list[dict[str, float]], settings: EmbedderConfig) -> None:
    if meta["source"] == "trained":
        save_feature_net(folder / meta["weights"], embedder.network)
    else:
        shutil.copyfile(settings.extractor, folder / meta["weights"])
    np.save(folder / "features.npy", features.astype(np.float32))
    write_atomic(folder / "embedder.json", json.dumps(meta, indent=2) + "\n")
    if log:
        write_log(folder / "training_log.csv", log, LOG_FIELDS)


# ---------------------------------------------------------------------------------------------
# Weights files and user-supplied extractors


def save_feature_net(path: Path, network: FeatureNet) -> None:
    """The weights file format of the module docstring: our encoder + head, architecture inside."""
    save_file(cpu_state(network), str(path),
              metadata={WEIGHTS_FORMAT: json.dumps(network.architecture, sort_keys=True)})


def existing_file(path: Path) -> Path:
    """The user's extractor file, or an error naming the option."""
    if not path.is_file():
        raise UserError(f"embedder.extractor {path}: no such file")
    return path


def load_extractor(path: Path, device: torch.device) -> tuple[nn.Module, str]:
    """A user's extractor, by suffix: .safetensors = our weights format, else TorchScript."""
    path = existing_file(path)
    return load_network(path, device)


def check_extractor(module: nn.Module, path: Path, sample: np.ndarray, device: torch.device
                    ) -> int:
    """Run the extractor on real images [B, R, R] in [0, 1]; its feature size, or a UserError.

    It must map [B, 1, R, R] to finite [B, D]: anything else would break every later stage far
    from its cause.
    """
    batch = torch.from_numpy(np.asarray(sample, np.float32)).unsqueeze(1).to(device)
    shape = list(batch.shape)
    try:
        with torch.no_grad():
            out = module(batch)
    except Exception as error:  # the user's code may raise anything
        raise UserError(f"embedder.extractor {path}: fails on images of shape {shape} in [0, 1] "
                        f"({first_line(error)})") from None
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != shape[0]:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UserError(f"embedder.extractor {path}: maps images of shape {shape} to {got}, "
                        f"expected [{shape[0]}, D]")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise UserError(f"embedder.extractor {path}: gives non-finite or non-float features on "
                        f"images of shape {shape}")
    return int(out.shape[1])


def extractor_embedder(path: Path, dataset: CanonicalDataset, device: torch.device
                        ) -> tuple[Embedder, dict[str, Any]]:
    module, kind = load_extractor(path, device)
    dim = check_extractor(module, path, _unit_range(dataset, slice(0, 2))[:, 0], device)
    weights = "embedder.safetensors" if kind == "safetensors" else "extractor.pt"
    meta = {"source": "extractor", "weights": weights, "weights_format": kind,
            "extractor": {"file": path.name, "sha256": sha256_file(path)},
            "architecture": getattr(module, "architecture", None), "method": None,
            "steps_done": 0, "seconds": 0.0}
    return Embedder(module, dataset.resolution, dim, device), meta
