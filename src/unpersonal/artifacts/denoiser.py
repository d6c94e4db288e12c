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


def init_folder(source: Path) -> Path:
    """The folder of `diffusion.init`'s weights: a run's fit-diffusion folder, or `source`
    itself (a folder with model.json and ema.safetensors)."""
    published = source / "fit-diffusion"
    return published if (published / "model.json").is_file() else source


def initial_weights(denoiser: Denoiser, source: Path) -> dict[str, Any]:
    """Load another run's denoiser into `denoiser` (`diffusion.init`, `fit-diffusion --init`),
    for example one trained on public data before fine-tuning under differential privacy.

    `source` is a run folder or a folder with model.json and ema.safetensors. The UNet must be
    the same; tensors of another shape (the label embedding of data with other labels) keep
    their fresh initialisation. Returns what the datasheet says of the starting point."""
    folder = init_folder(source)
    if not (folder / "model.json").is_file() or not (folder / "ema.safetensors").is_file():
        raise UserError(f"diffusion.init {source}: neither a run with a trained diffusion model "
                        "nor a folder with model.json and ema.safetensors")
    meta = json.loads((folder / "model.json").read_text())
    ours = denoiser.state_dict()
    theirs = load_file(str(folder / "ema.safetensors"))
    matching = {name: value for name, value in theirs.items()
                if name in ours and ours[name].shape == value.shape}
    if len(matching) < len(ours) // 2:
        raise UserError(f"diffusion.init {source}: its UNet ({meta['unet']}) is not this run's; "
                        "set diffusion.model_channels, channel_mult, num_blocks and "
                        "attn_resolutions as it was trained")
    denoiser.load_state_dict(matching, strict=False)
    dataset = folder.parent / "prepare" / "dataset.json"
    trained_on = (json.loads(dataset.read_text()).get("source", "not recorded")
                  if dataset.is_file() else "not recorded")
    return {"trained_on": trained_on, "steps": meta.get("steps_done"),
            "tensors_loaded": len(matching), "tensors_fresh": sorted(set(ours) - set(matching))}
