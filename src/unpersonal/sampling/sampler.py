"""The sampler: a trained denoiser and the conditions of the training images, ready to draw.

    sampler = load_sampler(run.stage_path("fit-diffusion"), train, config.sampling,
                           guidance=w, device=device)
    batch = sampler.draw(rows, seeds, guidance=w)   # images [M, R, R] at the data's bit depth

A latent denoiser draws latents, which its autoencoder decodes here: whatever the sampler
returns is an image. The models are loaded once and kept apart from what is drawn with them (as
diffusers keeps its models apart from its schedulers): which training row conditions an image,
its noise seed and its guidance weight are the caller's (`schedule`), the solver is
`solvers.sample`. `unpersonal sample` and `unpersonal generate` both draw through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unpersonal.artifacts.autoencoder import LatentCodec
from unpersonal.artifacts.denoiser import data_shape, load_denoiser, load_denoiser_codec
from unpersonal.config import SamplingConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.data.pixels import quantize
from unpersonal.errors import UserError
from unpersonal.models.conditioning import Conditioner, label_code, neighbour_conditions
from unpersonal.models.edm import Denoiser
from unpersonal.sampling.solvers import SampleResult, sample


@dataclass(frozen=True)
class SampleBatch:
    """Images drawn in one `Sampler.draw` call and what they cost."""

    images: np.ndarray
    """[M, R, R] grey levels at the data's bit depth."""
    evaluations: int
    """Network forward passes, summed over the images (guidance included)."""


@dataclass(frozen=True)
class Sampler:
    """A denoiser (and its autoguidance guide) with the condition of every training image."""

    denoiser: Denoiser
    guide: Denoiser | None
    conditioner: Conditioner
    codes: torch.Tensor
    """Label codes of the training images [N, L]."""
    pseudo: torch.Tensor
    """Pseudo-conditions (embeddings) of the training images [N, D]; D = 0 without them."""
    settings: SamplingConfig
    bit_depth: int
    meta: dict[str, Any]
    """The model's model.json."""
    device: torch.device
    codec: LatentCodec | None = None
    """The autoencoder of a latent denoiser (None in pixel space)."""

    @property
    def n_rows(self) -> int:
        """How many training images it can condition on."""
        return len(self.codes)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """What the solver draws: [1, R, R] images, or latents in latent space."""
        return data_shape(self.meta)

    def draw(self, rows: np.ndarray, seeds: Sequence[int], guidance: float) -> SampleBatch:
        """One image per (training row, seed) at guidance weight `guidance`, in batches of
        `sampling.batch_size`; each image depends on its seed and its row's condition only."""
        size = self.settings.batch_size
        images, evaluations = [], 0
        for start in range(0, len(rows), size):
            batch = rows[start:start + size]
            result = self._sample(batch, seeds[start:start + size], guidance=guidance,
                                  guide=self.guide, null=self.null(batch))
            images.append(to_stored(self._decoded(result.images), self.bit_depth))
            evaluations += result.nfe_per_sample * len(batch)
        return SampleBatch(np.concatenate(images), evaluations)

    def renoise(self, rows: np.ndarray, images: np.ndarray, sigma: float, seeds: Sequence[int]
                ) -> np.ndarray:
        """Training images [N, R, R] in [0, 1] noised to `sigma` and denoised back by the model,
        each conditioned on its own training row, without guidance: the near-copies a generator
        that memorised them would make (`privacy.leaks`). Float [N, R, R] in [0, 1]."""
        size, out = self.settings.batch_size, []
        for start in range(0, len(rows), size):
            clean = torch.from_numpy(np.asarray(images[start:start + size], np.float32)) * 2 - 1
            clean = clean[:, None].to(self.device)
            if self.codec is not None:
                clean = self.codec.encode(clean)
            result = self._sample(rows[start:start + size], seeds[start:start + size],
                                  sigma_max=sigma, start=clean)
            out.append(model_to_unit(self._decoded(result.images)))
        return np.concatenate(out)

    def _decoded(self, drawn: torch.Tensor) -> torch.Tensor:
        """What the solver drew as images in [-1, 1]: decoded in latent space."""
        return drawn if self.codec is None else self.codec.decode(drawn.to(self.device))

    def _sample(self, batch: np.ndarray, seeds: Sequence[int], **options: Any) -> SampleResult:
        """One batch of training rows through `sample` with the sampling settings; `options`
        add to them or replace them."""
        settings = self.settings
        return sample(self.denoiser, self.conditioner.build(self.codes[batch], self.pseudo[batch]),
                      [int(seed) for seed in seeds],
                      **{"solver": settings.solver, "num_steps": settings.steps,
                         "image_shape": self.data_shape, "sigma_min": settings.sigma_min,
                         "sigma_max": settings.sigma_max, "rho": settings.rho,
                         "device": self.device, **options})

    def null(self, rows: np.ndarray) -> torch.Tensor | None:
        """What classifier-free guidance pushes away from: None (the empty condition) or the
        labels alone."""
        return self.conditioner.null(self.codes[rows], self.pseudo[rows],
                                     self.settings.guidance_against)


def load_sampler(model_folder: Path, train: CanonicalDataset, settings: SamplingConfig,
                 guidance: float, device: torch.device, neighbours: int | None = None
                 ) -> Sampler:
    """The published denoiser of `fit-diffusion`, conditioned on the training images of `train`.

    With `neighbours`, each training image's pseudo-condition is the mean of its nearest training
    images of other patients (`neighbour_conditions`) instead of its own embedding. The guide
    network is loaded only when autoguidance is asked for and `guidance`, the weight drawing
    starts at, is not 1 (at w = 1 the guide is never evaluated).
    """
    denoiser, meta = load_denoiser(model_folder)
    guide = None
    if settings.guide == "autoguidance" and guidance != 1:
        guide, _ = load_denoiser(model_folder, "guide")
        guide.to(device)
    if meta["resolution"] != train.resolution:
        raise UserError(f"{model_folder} was trained at {meta['resolution']} px but the "
                        f"prepared data is {train.resolution} px; rerun fit-diffusion")
    conditioner = Conditioner(**meta["conditioner"])
    pseudo = (np.load(model_folder / "pseudo_features.npy") if conditioner.uses_pseudo
              else np.zeros((len(train), 0), np.float32))
    if neighbours is not None and conditioner.uses_pseudo:
        pseudo = neighbour_conditions(pseudo, train.patient_id, train.labels, neighbours)
    codec = load_denoiser_codec(model_folder, meta)
    return Sampler(denoiser.to(device), guide, conditioner,
                   torch.from_numpy(label_code(train.labels, train.label_kind)),
                   torch.from_numpy(pseudo),
                   settings, train.bit_depth, meta, device,
                   None if codec is None else codec.to(device))


def to_stored(images: torch.Tensor, bit_depth: int) -> np.ndarray:
    """Model output in [-1, 1] -> grey levels at the data's bit depth, [N, R, R]."""
    return quantize(model_to_unit(images), bit_depth)


def model_to_unit(images: torch.Tensor) -> np.ndarray:
    """Model output [N, 1, R, R] in [-1, 1] (clipped) -> float [N, R, R] in [0, 1]."""
    return ((images[:, 0].clamp(-1, 1) + 1) / 2).cpu().numpy()
