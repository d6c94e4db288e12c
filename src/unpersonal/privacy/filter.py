"""The privacy filter: may this image leave the hospital?

A candidate is rejected when any of three independent checks links it to a real training patient:

1. **re-identification**: its re-ID score against its source training image, and against every
   training image (the nearest in re-ID space, found with the kNN index; the score is monotone in
   the cosine, so the nearest is the highest-scoring), reaches the threshold calibrated on held-out
   patients;
2. **embedding floor**: it is closer, in the embedder's feature space, to some training image than
   almost all held-out real images are to theirs;
3. **pixel floor**: the same in pixel space (per-pixel RMSE).

`unpersonal calibrate` computes the floors from the validation split (held-out patients that the
re-ID threshold was also calibrated on) and the training images' re-ID embeddings; the test split
stays untouched for the audit. Everything here stays inside the run directory: indices point at
training rows, which carry patient IDs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unpersonal.config import Config
from unpersonal.data.canonical import load_canonical
from unpersonal.errors import UserError
from unpersonal.privacy.floor import DistanceFloor, floor_from_distances, pixel_vectors
from unpersonal.privacy.knn import NeighbourIndex
from unpersonal.privacy.reid import ReidModel, load_reid
from unpersonal.progress import console
from unpersonal.rundir import RunDir, sha256_json, write_atomic
from unpersonal.training.embedder import Embedder, load_embedder

STAGE = "calibrate"
CHECKS = ("reid", "embedding", "pixel")


def stage_key(config: Config, run: RunDir) -> str:
    inputs = {stage: run.require(stage) for stage in ("prepare", "fit-embedder", "fit-reid")}
    return sha256_json({"config": config.section_dump(("privacy",)), "inputs": inputs})


def run_calibrate(config: Config, run: RunDir, force: bool = False) -> bool:
    """Calibrate the distance floors and embed the training images for re-ID. False if skipped."""
    key = stage_key(config, run)
    if not force and run.is_fresh(STAGE, key):
        return False
    dataset = load_canonical(run.stage_path("prepare"))
    is_train, is_val = dataset.split == "train", dataset.split == "val"
    if not is_val.any():
        raise UserError("calibration needs validation patients (held out from training) and this "
                        "run's validation split is empty; set data.split_fractions with a "
                        "validation share")
    features = np.load(run.stage_path("fit-embedder") / "features.npy")
    pixels = pixel_vectors(dataset.images_float())
    reid = load_reid(run.stage_path("fit-reid"))
    console.print("calibrate: embedding the training images for re-identification")
    reid_train = reid.embed(dataset.images_float()[is_train])
    settings = config.privacy
    floors = {}
    for space, vectors, metric in (("embedding", features, "cosine"), ("pixel", pixels, "l2")):
        index = _index(settings, metric, config.seed).fit(vectors[is_train])
        nearest, _ = index.search(vectors[is_val], k=1)
        floors[space] = floor_from_distances(nearest[:, 0], settings.floor_quantile, metric)
    with run.build_stage(STAGE, key, config) as folder:
        np.save(folder / "reid_train.npy", reid_train)
        summary = {"calibrated_on": "val", "n_train": int(is_train.sum()),
                   "n_heldout": int(is_val.sum()),
                   "floors": {space: floor.to_json() for space, floor in floors.items()},
                   "reid_threshold": reid.threshold, "reid_sensitivity": reid.meta.get(
                       "sensitivity")}
        write_atomic(folder / "floors.json", json.dumps(summary, indent=2) + "\n")
    return True


def _index(settings: Any, metric: str, seed: int) -> NeighbourIndex:
    return NeighbourIndex(metric, exact_max=settings.knn_exact_max, lists=settings.knn_lists,
                          probe=settings.knn_probe, seed=seed)


@dataclass
class FilterResult:
    """Per-candidate scores, nearest training rows, and the decision of each check."""

    reid_score: np.ndarray  # highest score against any training image (or the source)
    reid_nearest: np.ndarray  # training row of the nearest image in re-ID space
    embedding_distance: np.ndarray
    embedding_nearest: np.ndarray
    pixel_distance: np.ndarray
    pixel_nearest: np.ndarray
    flags: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rejected(self) -> np.ndarray:
        return np.logical_or.reduce([self.flags[check] for check in CHECKS])

    def __len__(self) -> int:
        return len(self.reid_score)


@dataclass
class PrivacyFilter:
    """The three checks, ready to run on batches of candidates."""

    embedder: Embedder
    reid: ReidModel
    reid_train: np.ndarray
    reid_index: NeighbourIndex
    embedding_index: NeighbourIndex
    pixel_index: NeighbourIndex
    floors: dict[str, DistanceFloor]

    @classmethod
    def load(cls, run: RunDir, config: Config) -> PrivacyFilter:
        """Build the filter from a run's calibrate, fit-embedder, fit-reid and prepare stages."""
        run.require(STAGE)
        dataset = load_canonical(run.stage_path("prepare"))
        is_train = dataset.split == "train"
        summary = json.loads((run.stage_path(STAGE) / "floors.json").read_text())
        reid_train = np.load(run.stage_path(STAGE) / "reid_train.npy")
        features = np.load(run.stage_path("fit-embedder") / "features.npy")[is_train]
        pixels = pixel_vectors(dataset.images_float()[is_train])
        settings = config.privacy
        return cls(
            embedder=load_embedder(run.stage_path("fit-embedder")),
            reid=load_reid(run.stage_path("fit-reid")),
            reid_train=reid_train,
            reid_index=_index(settings, "cosine", config.seed).fit(reid_train),
            embedding_index=_index(settings, "cosine", config.seed).fit(features),
            pixel_index=_index(settings, "l2", config.seed).fit(pixels),
            floors={space: DistanceFloor.from_json(floor)
                    for space, floor in summary["floors"].items()})

    def check(self, images: np.ndarray, sources: np.ndarray | None = None) -> FilterResult:
        """images: float [M, R, R] in [0, 1]; sources: the training row each was drawn for.

        The source is checked explicitly, not only through the index: an approximate index may
        miss it, and it is the image a leak would most likely copy.
        """
        reid_embedding = self.reid.embed(images)
        cosine_distance, reid_nearest = self.reid_index.search(reid_embedding, k=1)
        best_cosine = 1.0 - cosine_distance[:, 0]
        if sources is not None:
            source_cosine = np.einsum("nd,nd->n", reid_embedding, self.reid_train[sources])
            use_source = source_cosine > best_cosine
            best_cosine = np.where(use_source, source_cosine, best_cosine)
            reid_nearest[:, 0] = np.where(use_source, sources, reid_nearest[:, 0])
        reid_score = self.reid.score(best_cosine[:, None], np.ones((len(images), 1)))
        embedding_distance, embedding_nearest = self.embedding_index.search(
            self.embedder.embed(images), k=1)
        pixel_distance, pixel_nearest = self.pixel_index.search(pixel_vectors(images), k=1)
        result = FilterResult(reid_score, reid_nearest[:, 0], embedding_distance[:, 0],
                              embedding_nearest[:, 0], pixel_distance[:, 0], pixel_nearest[:, 0])
        result.flags = {"reid": self.reid.flags(reid_score),
                        "embedding": self.floors["embedding"].flags(result.embedding_distance),
                        "pixel": self.floors["pixel"].flags(result.pixel_distance)}
        return result
