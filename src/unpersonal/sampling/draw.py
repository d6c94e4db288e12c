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
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unpersonal.config import Config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.data.pixels import quantize
from unpersonal.models.conditioning import Conditioner, label_code
from unpersonal.progress import LiveBar
from unpersonal.rundir import RunDir, sha256_json, write_atomic, write_npz_atomic
from unpersonal.sampling.solvers import sample
from unpersonal.training.diffusion import STAGE as FIT_STAGE, load_denoiser

STAGE = "sample"
GRID_COLUMNS = 8
# The batch size changes how fast images are drawn, not which: every image has its own noise
# seed (tests/test_solvers.py), so it is left out of the stage keys that sampling settings enter.
SPEED_ONLY = ("batch_size",)


def stage_key(config: Config, run: RunDir) -> str:
    settings = {name: value for name, value in config.section_dump(("sampling",))[
        "sampling"].items() if name not in SPEED_ONLY}
    return sha256_json({"config": {"seed": config.seed, "sampling": settings},
                        "inputs": {"fit-diffusion": run.require(FIT_STAGE),
                                   "prepare": run.require("prepare")}})


def run_sample(config: Config, run: RunDir, force: bool = False) -> bool:
    """Draw `sampling.count` images; False when the stage was up to date."""
    key = stage_key(config, run)
    if run.up_to_date(STAGE, key, force):
        return False
    train = load_canonical(run.stage_path("prepare")).subset("train")
    drawn = draw(config, run.stage_path(FIT_STAGE), train)
    with run.build_stage(STAGE, key, config) as folder:
        write_npz_atomic(folder / "images.npz", images=drawn["images"],
                         labels=train.labels[drawn["source"]], source=drawn["source"])
        write_atomic(folder / "grid.png", _png(real_vs_synthetic_grid(train, drawn)))
        write_atomic(folder / "sampling.json", json.dumps(drawn["report"], indent=2) + "\n")
    return True


def source_indices(seed: int, count: int, n_train: int) -> np.ndarray:
    """Which training image conditions each sample: seeded shuffles, cycled to `count`."""
    rounds = -(-count // n_train)
    order = np.concatenate([np.random.default_rng([seed, 1, r]).permutation(n_train)
                            for r in range(rounds)])
    return order[:count]


def sample_seeds(seed: int, indices: np.ndarray) -> list[int]:
    """One noise seed per output image, a pure function of (run seed, image number)."""
    return [int(np.random.SeedSequence([seed, 2, int(i)]).generate_state(1)[0]) for i in indices]


def draw(config: Config, model_folder: Path, train: CanonicalDataset) -> dict[str, Any]:
    settings = config.sampling
    denoiser, meta = load_denoiser(model_folder)
    guide = None
    if settings.guide == "autoguidance" and settings.guidance != 1:
        guide, _ = load_denoiser(model_folder, "guide")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    denoiser.to(device)
    if guide is not None:
        guide.to(device)
    conditioner = Conditioner(**meta["conditioner"])
    codes = torch.from_numpy(label_code(train.labels, train.label_kind))
    pseudo = (torch.from_numpy(np.load(model_folder / "pseudo_features.npy"))
              if conditioner.uses_pseudo else torch.zeros(len(train), 0))
    source = source_indices(config.seed, settings.count, len(train))
    seeds = sample_seeds(config.seed, np.arange(settings.count))
    shape = (meta["channels"], meta["resolution"], meta["resolution"])
    images, nfe, started = [], 0, time.perf_counter()
    with LiveBar("sampling", settings.count, log_every=settings.batch_size) as bar:
        for start in range(0, settings.count, settings.batch_size):
            rows = source[start:start + settings.batch_size]
            cond = conditioner.build(codes[rows], pseudo[rows])
            result = sample(denoiser, cond, seeds[start:start + len(rows)],
                            solver=settings.solver, num_steps=settings.steps,
                            guidance=settings.guidance, guide=guide, image_shape=shape,
                            sigma_min=settings.sigma_min, sigma_max=settings.sigma_max,
                            rho=settings.rho, device=device,
                            null=conditioner.null(codes[rows], pseudo[rows],
                                                  settings.guidance_against))
            images.append(to_stored(result.images, train.bit_depth))
            nfe = result.nfe_per_sample
            bar.update(len(rows))
    seconds = time.perf_counter() - started
    report = {"solver": settings.solver, "steps": settings.steps, "guidance": settings.guidance,
              "guide": settings.guide, "guidance_against": settings.guidance_against,
              "nfe_per_image": nfe, "count": settings.count,
              "seconds": round(seconds, 2), "images_per_s": round(settings.count / seconds, 3),
              "model_steps": meta["steps_done"], "device": device.type}
    return {"images": np.concatenate(images), "source": source, "report": report}


def to_stored(images: torch.Tensor, bit_depth: int) -> np.ndarray:
    """Model output in [-1, 1] -> grey levels at the data's bit depth, [N, R, R]."""
    unit = ((images[:, 0].clamp(-1, 1) + 1) / 2).cpu().numpy()
    return quantize(unit, bit_depth)


def real_vs_synthetic_grid(train: CanonicalDataset, drawn: dict[str, Any]) -> np.ndarray:
    """For each class: a row of real training images above a row of samples of that class."""
    classes = train.labels.argmax(axis=1) if train.label_kind == "multiclass" else train.labels[:, 0]
    synthetic_classes = classes[drawn["source"]]
    rows = []
    for value in np.unique(classes):
        real = train.images[classes == value][:GRID_COLUMNS]
        fake = drawn["images"][synthetic_classes == value][:GRID_COLUMNS]
        rows += [_row(real, train.resolution), _row(fake, train.resolution)]
    grid = np.concatenate(rows, axis=0)
    return (grid >> 8).astype(np.uint8) if grid.dtype == np.uint16 else grid


def _row(images: np.ndarray, size: int) -> np.ndarray:
    padded = np.zeros((GRID_COLUMNS, size, size), dtype=images.dtype)
    padded[: len(images)] = images[:GRID_COLUMNS]
    return np.concatenate(list(padded), axis=1)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    scale = max(1, 768 // max(pixels.shape))  # nearest-neighbour zoom: pixels stay visible
    image = Image.fromarray(pixels)
    image.resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST).save(
        buffer, format="PNG")
    return buffer.getvalue()
