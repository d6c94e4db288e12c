"""`unpersonal fit-autoencoder`: the KL autoencoder latent diffusion denoises in.

One loop, like the other trainers: every random draw of step t (which images, the posterior
noise) comes from (seed, t), so a resumed run repeats an uninterrupted one. The loss needs no
downloaded weights:

    L = |x - D(z)|_1 + ssim_weight * (1 - SSIM(x, D(z))) + kl_weight * KL(q(z|x) || N(0, I)),
    z = mu + sigma * eps

    run/.work/fit-autoencoder/checkpoint.pt   resumable state (weights, Adam, step, log)
    run/fit-autoencoder/                      published when training ends:
        autoencoder.safetensors  the weights (`models.autoencoder.KLAutoencoder`)
        autoencoder.json         architecture, latent statistics of the training split,
                                 reconstruction PSNR / SSIM on the validation split
        training_log.csv         step, loss, learning rate, images/s, elapsed seconds
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from unpersonal.artifacts.autoencoder import META, WEIGHTS
from unpersonal.config import AutoencoderConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError
from unpersonal.models.autoencoder import architecture, build_autoencoder, kl_divergence
from unpersonal.rundir import write_atomic
from unpersonal.training.common import cosine_lr, cpu_state, descend
from unpersonal.training.loop import SeededBatches, TrainingLoop, write_log

LOG_FIELDS = ("step", "loss", "lr", "images_per_s", "elapsed_s")
WARMUP_SHARE = 0.02
SSIM_WINDOW = 7  # skimage's default window; an 11-pixel one leaves little of a 16 px image
ENCODE_BATCH = 64


@dataclass
class TrainingResult:
    network: nn.Module
    log: list[dict[str, float]]
    steps_done: int
    seconds: float


def ssim_loss(data_range: float) -> nn.Module:
    """MONAI's 1 - SSIM per image (Gaussian window), for the loss and the reported figure."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.losses import SSIMLoss

    return SSIMLoss(spatial_dims=2, data_range=data_range, win_size=SSIM_WINDOW,
                    reduction="none")


def to_model_range(dataset: CanonicalDataset, rows: np.ndarray | slice) -> Tensor:
    """Stored grey levels of some rows -> float [B, 1, R, R] in [-1, 1]."""
    scale = 2.0 / float((1 << dataset.bit_depth) - 1)
    return torch.from_numpy(dataset.images[rows].astype(np.float32) * scale - 1.0)[:, None]


def train(settings: AutoencoderConfig, seed: int, train_split: CanonicalDataset,
          checkpoint: Path, device: torch.device, stage: str) -> TrainingResult:
    """The loop; saves `checkpoint` every `checkpoint_every` steps and on Ctrl-C / SIGTERM."""
    n = len(train_split)
    if n == 0:
        raise UserError("the training split is empty: nothing to train the autoencoder on")
    if train_split.resolution % settings.factor:
        raise UserError(f"autoencoder.factor {settings.factor} does not divide data.resolution "
                        f"{train_split.resolution}")
    batch = min(settings.batch_size, n)
    torch.manual_seed(seed)
    network = build_autoencoder(**_architecture(settings)).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.lr)
    loop = TrainingLoop(stage, checkpoint, settings.steps,
                        checkpoint_every=settings.checkpoint_every,
                        max_minutes=settings.max_minutes, images_per_step=batch)
    loop.resume(model=network, optimizer=optimizer)
    batches = SeededBatches(seed, n, batch, device)
    structure = ssim_loss(data_range=2.0)
    warmup = max(1, round(WARMUP_SHARE * settings.steps))
    network.train()
    with loop.running("training autoencoder"):
        for step in loop.steps():
            indices, generator = batches.draw(step)
            images = to_model_range(train_split, indices.numpy()).to(device)
            mu, sigma = network.encode(images)
            z = mu + sigma * torch.randn(mu.shape, generator=generator, device=device)
            reconstruction = network.decode(z)
            loss = ((reconstruction - images).abs().mean()
                    + settings.ssim_weight * structure(reconstruction, images).mean()
                    + settings.kl_weight * kl_divergence(mu, sigma))
            lr = cosine_lr(step, settings.steps, settings.lr, warmup)
            descend(optimizer, loss, lr)
            loop.record(loss.item(), lr=lr)
    return TrainingResult(network.eval(), loop.log, loop.step, loop.elapsed())


def _architecture(settings: AutoencoderConfig) -> dict[str, Any]:
    return architecture(settings.width, settings.factor, settings.latent_channels,
                        settings.res_blocks)


@torch.no_grad()
def encode_means(network: nn.Module, dataset: CanonicalDataset, device: torch.device
                 ) -> Tensor:
    """Posterior means of every image of `dataset`, float [N, C, R/f, R/f] on the CPU."""
    parts = [network.encode(to_model_range(dataset, slice(start, start + ENCODE_BATCH))
                            .to(device))[0].cpu()
             for start in range(0, len(dataset), ENCODE_BATCH)]
    return torch.cat(parts)


def latent_statistics(means: Tensor) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation of the training latents (the scale the
    denoiser's data is standardised by)."""
    return {"mean": means.mean(dim=(0, 2, 3)).tolist(),
            "std": means.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()}


@torch.no_grad()
def reconstruction_quality(network: nn.Module, dataset: CanonicalDataset,
                           device: torch.device) -> dict[str, Any]:
    """Mean PSNR (dB, images in [0, 1]) and SSIM of `dataset`'s images through the
    autoencoder (posterior means, no sampling), each with its number of images."""
    if len(dataset) == 0:
        return {"images": 0, "psnr": None, "ssim": None}
    structure = ssim_loss(data_range=1.0)
    psnr, ssim = [], []
    for start in range(0, len(dataset), ENCODE_BATCH):
        images = to_model_range(dataset, slice(start, start + ENCODE_BATCH)).to(device)
        decoded = network.decode(network.encode(images)[0]).clamp(-1, 1)
        original, restored = (images + 1) / 2, (decoded + 1) / 2
        mse = (original - restored).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnr.append((-10 * torch.log10(mse)).cpu())
        ssim.append((1 - structure(restored, original).flatten(1).mean(1)).cpu())
    return {"images": len(dataset), "psnr": round(float(torch.cat(psnr).mean()), 3),
            "ssim": round(float(torch.cat(ssim).mean()), 4)}


def publish(folder: Path, result: TrainingResult, settings: AutoencoderConfig,
            dataset: CanonicalDataset, device: torch.device) -> dict[str, Any]:
    """Weights, autoencoder.json (returned) and the training log."""
    means = encode_means(result.network, dataset.subset("train"), device)
    meta = {
        "architecture": _architecture(settings), "resolution": dataset.resolution,
        "latent_shape": list(means.shape[1:]),
        "latent_statistics": latent_statistics(means),
        "reconstruction": {"val": reconstruction_quality(result.network, dataset.subset("val"),
                                                         device)},
        "steps_planned": settings.steps, "steps_done": result.steps_done,
        "seconds": round(result.seconds, 1),
        "parameters": sum(p.numel() for p in result.network.parameters()),
    }
    save_file(cpu_state(result.network), str(folder / WEIGHTS))
    write_atomic(folder / META, json.dumps(meta, indent=2) + "\n")
    write_log(folder / "training_log.csv", result.log, LOG_FIELDS)
    return meta
