"""The denoiser `fit-diffusion` publishes: the EDM-preconditioned UNet that `sample` and
`generate` draw images from.

    denoiser, meta = load_denoiser(run.stage_path("fit-diffusion"))           # the EMA weights
    guide, _ = load_denoiser(run.stage_path("fit-diffusion"), "guide")        # autoguidance

The folder holds ema.safetensors, guide.safetensors (an early EMA snapshot) and model.json, which
is enough to rebuild the network without the config it was trained with. A latent denoiser's
folder also holds its autoencoder (`load_denoiser_codec`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from unpersonal.artifacts.autoencoder import LatentCodec, load_codec
from unpersonal.config import DiffusionConfig
from unpersonal.errors import UserError
from unpersonal.models.conditioning import Conditioner
from unpersonal.models.edm import Denoiser
from unpersonal.models.unet import UNet


def build_denoiser(settings: DiffusionConfig, resolution: int, conditioner: Conditioner,
                   channels: int = 1) -> Denoiser:
    """The untrained network these settings describe for data [channels, resolution,
    resolution] (images, or latents), the trainer's starting point."""
    try:
        net = UNet(resolution, channels, conditioner.dim, model_channels=settings.model_channels,
                   channel_mult=settings.channel_mult, num_blocks=settings.num_blocks,
                   attn_resolutions=settings.attn_resolutions, dropout=settings.dropout)
    except ValueError as error:
        raise UserError(f"diffusion model: {error}") from None
    return Denoiser(net, sigma_data=settings.sigma_data)


def load_denoiser(folder: Path, which: str = "ema") -> tuple[Denoiser, dict[str, Any]]:
    """A published denoiser ("ema" or "guide") in eval mode, on the CPU, with its model.json."""
    meta = json.loads((folder / "model.json").read_text())
    settings = DiffusionConfig(**meta["unet"], sigma_data=meta["sigma_data"])
    conditioner = Conditioner(**meta["conditioner"])
    channels, resolution = data_shape(meta)[:2]
    denoiser = build_denoiser(settings, resolution, conditioner, channels)
    denoiser.load_state_dict(load_file(str(folder / f"{which}.safetensors")))
    return denoiser.eval().requires_grad_(False), meta


def data_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """[C, R, R] of what the denoiser denoises: the image, or in latent space its latent."""
    latent = meta.get("latent")
    if latent is None:
        return (meta["channels"], meta["resolution"], meta["resolution"])
    return (latent["channels"], latent["resolution"], latent["resolution"])


def load_denoiser_codec(folder: Path, meta: dict[str, Any]) -> LatentCodec | None:
    """The autoencoder a latent denoiser was trained with (None in pixel space)."""
    if meta.get("latent") is None:
        return None
    return load_codec(folder, meta["sigma_data"])
