"""The denoiser `fit-diffusion` publishes: the EDM-preconditioned UNet that `sample` and
`generate` draw images from.

    denoiser, meta = load_denoiser(run.stage_path("fit-diffusion"))           # the EMA weights
    guide, _ = load_denoiser(run.stage_path("fit-diffusion"), "guide")        # autoguidance

The folder holds ema.safetensors, guide.safetensors (an early EMA snapshot) and model.json, which
is enough to rebuild the network without the config it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from unpersonal.config import DiffusionConfig
from unpersonal.errors import UserError
from unpersonal.models.conditioning import Conditioner
from unpersonal.models.edm import Denoiser
from unpersonal.models.unet import UNet


def build_denoiser(settings: DiffusionConfig, resolution: int, conditioner: Conditioner
                   ) -> Denoiser:
    """The untrained network these settings describe (the trainer starts from it)."""
    try:
        net = UNet(resolution, 1, conditioner.dim, model_channels=settings.model_channels,
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
    denoiser = build_denoiser(settings, meta["resolution"], conditioner)
    denoiser.load_state_dict(load_file(str(folder / f"{which}.safetensors")))
    return denoiser.eval().requires_grad_(False), meta
