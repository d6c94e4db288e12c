"""`unpersonal sample`: draw images from the trained denoiser, unfiltered, to look at the model.

    run/sample/
        images.npz      images [N, R, R] at the data's bit depth, labels [N, C], source [N]
                        (the training image whose condition each sample used: private)
        grid.png        per class, a row of real training images over a row of samples
        sampling.json   solver, steps, guidance, NFE per image, seconds, images/s

This is the raw generator, before any privacy filter: nothing here may be exported.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from unpersonal.data.canonical import CanonicalDataset
from unpersonal.progress import LiveBar
from unpersonal.sampling.sampler import Sampler
from unpersonal.sampling.schedule import sample_seeds, source_indices

GRID_COLUMNS = 8


@dataclass(frozen=True)
class Samples:
    """What `unpersonal sample` drew."""

    images: np.ndarray
    """[N, R, R] at the data's bit depth."""
    source: np.ndarray
    """The training row whose condition each image used (private)."""
    report: dict[str, Any]
    """sampling.json's content."""


def draw_samples(sampler: Sampler, seed: int, count: int) -> Samples:
    """`count` images at `sampling.guidance`, each conditioned on a training image of the seeded
    order and drawn from its own seed, so that the batch size changes nothing but the speed."""
    settings = sampler.settings
    source = source_indices(seed, count, sampler.n_rows)
    seeds = sample_seeds(seed, np.arange(count))
    images, evaluations, started = [], 0, time.perf_counter()
    with LiveBar("sampling", count, log_every=settings.batch_size) as bar:
        for start in range(0, count, settings.batch_size):
            rows = source[start:start + settings.batch_size]
            batch = sampler.draw(rows, seeds[start:start + len(rows)], settings.guidance)
            images.append(batch.images)
            evaluations += batch.evaluations
            bar.update(len(rows))
    seconds = time.perf_counter() - started
    report = {"solver": settings.solver, "steps": settings.steps, "guidance": settings.guidance,
              "guide": settings.guide, "guidance_against": settings.guidance_against,
              "nfe_per_image": evaluations // count, "count": count,
              "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 3),
              "model_steps": sampler.meta["steps_done"], "device": sampler.device.type}
    return Samples(np.concatenate(images), source, report)


def real_vs_synthetic_grid(train: CanonicalDataset, samples: Samples) -> np.ndarray:
    """For each class: a row of real training images above a row of samples of that class."""
    classes = train.labels.argmax(axis=1) if train.label_kind == "multiclass" else train.labels[:, 0]
    synthetic_classes = classes[samples.source]
    rows = []
    for value in np.unique(classes):
        real = train.images[classes == value][:GRID_COLUMNS]
        fake = samples.images[synthetic_classes == value][:GRID_COLUMNS]
        rows += [_row(real, train.resolution), _row(fake, train.resolution)]
    grid = np.concatenate(rows, axis=0)
    return (grid >> 8).astype(np.uint8) if grid.dtype == np.uint16 else grid


def _row(images: np.ndarray, size: int) -> np.ndarray:
    padded = np.zeros((GRID_COLUMNS, size, size), dtype=images.dtype)
    padded[: len(images)] = images[:GRID_COLUMNS]
    return np.concatenate(list(padded), axis=1)


def grid_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    scale = max(1, 768 // max(pixels.shape))  # nearest-neighbour zoom: pixels stay visible
    image = Image.fromarray(pixels)
    image.resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST).save(
        buffer, format="PNG")
    return buffer.getvalue()
