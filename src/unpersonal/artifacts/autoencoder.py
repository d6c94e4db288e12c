"""The autoencoder `fit-autoencoder` publishes, as the latent diffusion model uses it.

    codec = load_codec(run.stage_path("fit-autoencoder"), sigma_data=0.5)
    latents = codec.encode(images)    # float [B, 1, R, R] in [-1, 1] -> [B, C, R/f, R/f]
    images = codec.decode(latents)    # and back, clipped to [-1, 1]

Latents are the posterior means, standardised per channel with the training split's statistics
and scaled to the denoiser's sigma_data, the data scale its EDM preconditioning assumes. The
folder holds autoencoder.safetensors and autoencoder.json (architecture, latent statistics,
reconstruction figures); `fit-diffusion` copies both into its own folder in latent space, so that
a published denoiser carries the decoder it was trained for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from unpersonal.models.autoencoder import build_autoencoder

WEIGHTS = "autoencoder.safetensors"
META = "autoencoder.json"


@dataclass
class LatentCodec:
    """A frozen autoencoder with the latent statistics that standardise its means."""

    network: nn.Module
    mean: Tensor
    """[C] per-channel mean of the training latents."""
    std: Tensor
    """[C] per-channel standard deviation of the training latents."""
    sigma_data: float
    meta: dict[str, Any]
    folder: Path
    """Where it was loaded from."""

    @property
    def factor(self) -> int:
        return int(self.meta["architecture"]["factor"])

    def to(self, device: torch.device) -> LatentCodec:
        self.network.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 1, R, R] in [-1, 1] -> scaled latents [B, C, R/f, R/f]."""
        return self.standardise(self.network.encode(images)[0])

    def standardise(self, means: Tensor) -> Tensor:
        """Posterior means -> the scaled latents the denoiser learns, on the means' device."""
        mean, std = self.mean.to(means.device), self.std.to(means.device)
        return (means - mean[:, None, None]) / std[:, None, None] * self.sigma_data

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images [B, 1, R, R] in [-1, 1]."""
        mu = latents / self.sigma_data * self.std[:, None, None] + self.mean[:, None, None]
        return self.network.decode(mu).clamp(-1, 1)


def load_codec(folder: Path, sigma_data: float) -> LatentCodec:
    """The autoencoder published in `folder`, in eval mode on the CPU."""
    meta = json.loads((Path(folder) / META).read_text())
    network = build_autoencoder(**meta["architecture"])
    network.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    stats = meta["latent_statistics"]
    return LatentCodec(network.eval().requires_grad_(False),
                       torch.tensor(stats["mean"], dtype=torch.float32),
                       torch.tensor(stats["std"], dtype=torch.float32), sigma_data, meta,
                       Path(folder))
