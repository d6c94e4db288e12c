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

import csv
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unpersonal.config import Config, EmbedderConfig
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.errors import UserError
from unpersonal.metrics.probe import linear_probe_auc
from unpersonal.models.encoder import ResNetEncoder, unit_norm
from unpersonal.progress import LiveBar, console
from unpersonal.rundir import RunDir, sha256_file, sha256_json, write_atomic
from unpersonal.torch_utils import batch_indices, pick_device, step_generator
from unpersonal.training.common import cpu_state, interrupted, load_state, out_of_time, save_state
from unpersonal.training.views import random_views

STAGE = "fit-embedder"
WEIGHTS_FORMAT = "unpersonal-embedder-v1"
LOG_EVERY = 10
LOG_FIELDS = ("step", "loss", "lr", "images_per_s", "elapsed_s")
WARMUP_SHARE = 0.05  # of the steps: a short linear warm-up before the cosine decay
VICREG_WEIGHTS = (25.0, 25.0, 1.0)  # invariance, variance, covariance (Bardes et al. 2022)
EMBED_BATCH = 256


class FeatureNet(nn.Module):
    """Encoder + linear head: images [B, 1, R, R] -> features [B, dim], before normalisation.

    The published feature is unit_norm(head(encoder(x))), taken BEFORE the projection MLP the
    self-supervised loss sees. The projector learns to throw away what the views differ by
    (exposure, position, blur); the layer before it keeps more of the image, which serves
    downstream tasks better (Chen et al. 2020 report >10 points of linear-probe accuracy) and
    is what a distance safeguard needs to tell near-copies apart. The linear head fixes the
    feature size at `dim` whatever the encoder width, and is trained with everything else.
    """

    def __init__(self, width: int, dim: int, blocks_per_stage: int = 1) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(in_channels=1, width=width, blocks_per_stage=blocks_per_stage)
        self.head = nn.Linear(self.encoder.out_features, dim)
        self.architecture = {"in_channels": 1, "width": width, "blocks_per_stage": blocks_per_stage,
                             "dim": dim}

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))


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


def cosine_lr(step: int, base_lr: float, total_steps: int) -> float:
    """Linear warm-up over the first WARMUP_SHARE of the steps, then cosine decay towards 0.

    `step` is the 0-based index of the step about to be taken; the first step already moves.
    """
    warmup = max(1, round(WARMUP_SHARE * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The stage


def stage_key(config: Config, run: RunDir) -> str:
    inputs: dict[str, Any] = {"prepare": run.require("prepare")}
    if config.embedder.extractor is not None:
        inputs["extractor"] = sha256_file(_existing_file(config.embedder.extractor))
    return sha256_json({"config": config.section_dump(("embedder", "data")), "inputs": inputs})


def run_fit_embedder(config: Config, run: RunDir, force: bool = False,
                     stage: str = STAGE) -> bool:
    """Train (or resume, or load the extractor, or skip when up to date). False when skipped.

    `stage` names the output folder: the audit trains its own models under other names."""
    key = stage_key(config, run)
    if run.up_to_date(stage, key, force):
        return False
    dataset = load_canonical(run.stage_path("prepare"))
    device = pick_device()
    if config.embedder.extractor is not None:
        embedder, meta = _extractor_embedder(config.embedder.extractor, dataset, device)
        log: list[dict[str, float]] = []
    else:
        work = run.resumable_work_dir(stage, key, force)
        result = train(config, dataset.subset("train"), work / "checkpoint.pt", device)
        embedder = Embedder(result.network, dataset.resolution, config.embedder.dim, device)
        meta, log = _trained_meta(config.embedder, result), result.log
    features = embed_dataset(embedder, dataset)
    meta["linear_probe"] = probe_features(features, dataset)
    meta.update({"dim": int(features.shape[1]), "resolution": dataset.resolution,
                 "n_images": len(dataset)})
    with run.build_stage(stage, key, config if stage == STAGE else None) as folder:
        publish(folder, embedder, meta, features, log, config.embedder)
    run.clear_work(stage)
    return True


@dataclass
class TrainingResult:
    network: FeatureNet
    log: list[dict[str, float]]
    steps_done: int
    seconds: float


def train(config: Config, train_split: CanonicalDataset, checkpoint: Path, device: torch.device
          ) -> TrainingResult:
    """The loop. Saves `checkpoint` every `checkpoint_every` steps and on Ctrl-C / SIGTERM."""
    settings = config.embedder
    n = len(train_split)
    if n < 2:
        raise UserError(f"the training split has {n} image(s): self-supervised training of the "
                        "embedder needs at least 2")
    # A batch larger than the split would hold copies of one image, negatives of each other.
    batch = min(settings.batch_size, n)
    torch.manual_seed(config.seed)
    network = FeatureNet(settings.width, settings.dim).to(device)
    model = nn.ModuleDict({"features": network, "projector": projector(settings.dim)}).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no weight decay on norms, biases
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    state = load_state(checkpoint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    step = state["step"] if state else 0
    log: list[dict[str, float]] = state["log"] if state else []
    elapsed_before = state["elapsed_s"] if state else 0.0
    started, window_loss, window_start = time.perf_counter(), [], time.perf_counter()
    model.train()

    def save() -> None:
        save_state(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step, "log": log,
                                "elapsed_s": elapsed_before + time.perf_counter() - started})

    if state is not None:
        console.print(f"{STAGE}: resuming at step {step} of {settings.steps}")
    try:
        with LiveBar(f"training embedder ({settings.method})", settings.steps, start=step,
                     log_every=LOG_EVERY * 10) as bar:
            while step < settings.steps and not out_of_time(settings.max_minutes, elapsed_before,
                                                            started):
                generator = step_generator(config.seed, step, device)
                indices = batch_indices(config.seed, step, 0, batch, 1, n)
                x = torch.from_numpy(_unit_range(train_split, indices.numpy())).to(device)
                view_a = random_views(x, settings.augment, generator)
                view_b = random_views(x, settings.augment, generator)
                z_a, z_b = model["projector"](network(torch.cat([view_a, view_b]))).chunk(2)
                if settings.method == "simclr":
                    loss = nt_xent(z_a, z_b, settings.temperature)
                else:
                    loss = vicreg(z_a, z_b)
                lr = cosine_lr(step, settings.lr, settings.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                window_loss.append(loss.item())
                if step % LOG_EVERY == 0 or step == settings.steps:
                    now = time.perf_counter()
                    rate = len(window_loss) * batch / (now - window_start)
                    log.append({"step": step, "loss": float(np.mean(window_loss)), "lr": lr,
                                "images_per_s": rate, "elapsed_s": elapsed_before + now - started})
                    window_loss, window_start = [], now
                    bar.update(0, loss=log[-1]["loss"], img_s=rate)
                bar.update(1)
                if step % settings.checkpoint_every == 0:
                    save()
    except KeyboardInterrupt:
        save()
        raise interrupted(STAGE, step, settings.steps) from None
    save()
    seconds = elapsed_before + time.perf_counter() - started
    return TrainingResult(network.eval(), log, step, seconds)


def _trained_meta(settings: EmbedderConfig, result: TrainingResult) -> dict[str, Any]:
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
        with open(folder / "training_log.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(log)


# ---------------------------------------------------------------------------------------------
# Weights files and user-supplied extractors


def save_feature_net(path: Path, network: FeatureNet) -> None:
    """The weights file format of the module docstring: our encoder + head, architecture inside."""
    save_file(cpu_state(network), str(path),
              metadata={WEIGHTS_FORMAT: json.dumps(network.architecture, sort_keys=True)})


def load_feature_net(path: Path) -> FeatureNet:
    """Rebuild a `FeatureNet` from a weights file alone; UserError naming the file otherwise."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(error)})") from None
    if WEIGHTS_FORMAT not in metadata:
        raise UserError(f"{path}: no {WEIGHTS_FORMAT!r} key in its safetensors metadata, the "
                        "architecture {in_channels, width, blocks_per_stage, dim} (see "
                        "unpersonal.training.embedder)")
    try:
        arch = json.loads(metadata[WEIGHTS_FORMAT])
        if arch.get("in_channels", 1) != 1:
            raise ValueError(f"in_channels {arch['in_channels']}, expected 1 (grey images)")
        network = FeatureNet(int(arch["width"]), int(arch["dim"]),
                             int(arch.get("blocks_per_stage", 1)))
        network.load_state_dict(load_file(str(path)))
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise UserError(f"{path}: weights do not match the architecture in its metadata "
                        f"({_first_line(error)})") from None
    return network.eval()


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"embedder.extractor {path}: no such file")
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_extractor(path: Path, device: torch.device) -> tuple[nn.Module, str]:
    """A user's extractor, by suffix: .safetensors = our weights format, else TorchScript."""
    path = _existing_file(path)
    if path.suffix == ".safetensors":
        return load_feature_net(path).to(device), "safetensors"
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript but still loads it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as error:  # TorchScript reports bad archives as several error types
        raise UserError(f"embedder.extractor {path}: not a TorchScript file "
                        f"({_first_line(error)}); save one with torch.jit.save, or give our "
                        ".safetensors weights format") from None
    return module.eval(), "torchscript"


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
                        f"({_first_line(error)})") from None
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != shape[0]:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UserError(f"embedder.extractor {path}: maps images of shape {shape} to {got}, "
                        f"expected [{shape[0]}, D]")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise UserError(f"embedder.extractor {path}: gives non-finite or non-float features on "
                        f"images of shape {shape}")
    return int(out.shape[1])


def _extractor_embedder(path: Path, dataset: CanonicalDataset, device: torch.device
                        ) -> tuple[Embedder, dict[str, Any]]:
    module, kind = load_extractor(path, device)
    dim = check_extractor(module, path, _unit_range(dataset, slice(0, 2))[:, 0], device)
    weights = "embedder.safetensors" if kind == "safetensors" else "extractor.pt"
    meta = {"source": "extractor", "weights": weights, "weights_format": kind,
            "extractor": {"file": path.name, "sha256": sha256_file(path)},
            "architecture": getattr(module, "architecture", None), "method": None,
            "steps_done": 0, "seconds": 0.0}
    return Embedder(module, dataset.resolution, dim, device), meta


# ---------------------------------------------------------------------------------------------
# Using a published embedder


@dataclass
class Embedder:
    """A frozen feature network; `embed` gives unit-norm float32 features."""

    network: nn.Module  # float [B, 1, R, R] in [0, 1] -> [B, dim]
    resolution: int
    dim: int
    device: torch.device

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = EMBED_BATCH) -> np.ndarray:
        """images: float [N, R, R] in [0, 1] -> unit-norm features float32 [N, D]."""
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.resolution, self.resolution):
            raise UserError(f"the embedder takes images [N, {self.resolution}, "
                            f"{self.resolution}], got {list(images.shape)}")
        self.network.eval()
        out = []
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.asarray(images[start:start + batch_size], np.float32))
            features = self.network(chunk.unsqueeze(1).to(self.device))
            out.append(unit_norm(features.float()).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32)


def load_embedder(folder: Path) -> Embedder:
    """The published embedder of a run (`run.stage_path("fit-embedder")`), on pick_device()."""
    meta = json.loads((Path(folder) / "embedder.json").read_text())
    device = pick_device()
    weights = Path(folder) / meta["weights"]
    if meta["weights_format"] == "torchscript":
        network, _ = load_extractor(weights, device)
    else:
        network = load_feature_net(weights).to(device)
    return Embedder(network, int(meta["resolution"]), int(meta["dim"]), device)
