"""The privacy filter: may this image leave the hospital?

A candidate is rejected when any of three independent checks links it to a real training patient:

1. **re-identification**: its re-ID score against its source training image reaches the pair
   threshold (calibrated to flag 99% of held-out same-patient pairs) when it was drawn from that
   image (conditioned on its embedding), or its score against any training image of any patient
   (the nearest in re-ID space, found with the kNN index; the score is monotone in the cosine,
   so the nearest is the highest-scoring) is higher than held-out patients' real images reach
   against theirs (`privacy.reid_heldout_quantile`, never below the pair threshold). One
   comparison gets the pair threshold; a maximum over thousands of patients needs the threshold
   of that maximum, or every new patient's image would be "linked" to someone by chance;
2. **embedding floor**: it is closer, in the embedder's feature space, to some training image than
   almost all held-out real images are to theirs;
3. **pixel floor**: the same in pixel space, aligned and standardised (`AlignedPixels`), so that a
   copy shifted by a few pixels or re-exposed is still next to its original.

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

from unpersonal.artifacts.embedder import Embedder, load_embedder
from unpersonal.artifacts.reid import ReidModel, load_reid
from unpersonal.config import GenerateConfig, PrivacyConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError
from unpersonal.privacy.floor import AlignedPixels, DistanceFloor, floor_from_distances
from unpersonal.privacy.knn import NeighbourIndex
from unpersonal.progress import console

CHECKS = ("reid", "embedding", "pixel")


def calibrate(dataset: CanonicalDataset, features: np.ndarray, reid: ReidModel,
              settings: PrivacyConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The distance floors and the any-patient re-ID threshold, from how close the validation
    images (held-out patients) come to the training images; `features` are the embedder's, of
    every image. Returns the training images' re-ID embeddings and floors.json's content."""
    is_train, is_val = dataset.split == "train", dataset.split == "val"
    if not is_val.any():
        raise UserError("calibration needs validation patients (held out from training) and this "
                        "run's validation split is empty; set data.split_fractions with a "
                        "validation share")
    console.print("calibrate: embedding the training images for re-identification")
    images = dataset.images_float()
    reid_train = reid.embed(images[is_train])
    heldout_best, _ = best_reid_scores(
        reid, reid_train, reid.embed(images[is_val]),
        _index(settings, "cosine", seed).fit(reid_train), settings.reid_neighbours)
    neighbour_threshold = max(reid.scorer.threshold, float(np.quantile(
        heldout_best, settings.reid_heldout_quantile)))
    embedding_index = _index(settings, "cosine", seed).fit(features[is_train])
    embedding_nearest, _ = embedding_index.search(features[is_val], k=1)
    pixels = AlignedPixels.from_settings(settings)
    pixel_nearest, _ = pixels.nearest(pixels.index(images[is_train]), images[is_val])
    floors = {space: floor_from_distances(nearest, settings.floor_quantile, "cosine")
              for space, nearest in (("embedding", embedding_nearest[:, 0]),
                                     ("pixel", pixel_nearest))}
    summary = {"calibrated_on": "val", "n_train": int(is_train.sum()),
               "n_heldout": int(is_val.sum()),
               "floors": {space: floor.to_json() for space, floor in floors.items()},
               "reid_threshold": reid.scorer.threshold,
               "reid_sensitivity": reid.meta.get("sensitivity"),
               "reid_neighbour_threshold": neighbour_threshold,
               "reid_heldout_best_score": {
                   "quantile": settings.reid_heldout_quantile,
                   "median": float(np.median(heldout_best)),
                   "share_at_pair_threshold": float(np.mean(
                       heldout_best >= reid.scorer.threshold))}}
    return reid_train, summary


def best_reid_scores(reid: ReidModel, reid_train: np.ndarray, queries: np.ndarray,
                     index: NeighbourIndex, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's highest re-ID score against any training image: its nearest in re-ID space
    (k of them searched, so an approximate index missing the very nearest costs nothing); and
    those k training rows."""
    k = min(neighbours, len(reid_train))
    distances, rows = index.search(queries, k=k)
    best_cosine = 1.0 - distances.min(axis=1)
    return reid.scorer.score(best_cosine), rows


def _index(settings: Any, metric: str, seed: int) -> NeighbourIndex:
    return NeighbourIndex(metric, exact_max=settings.knn_exact_max, lists=settings.knn_lists,
                          probe=settings.knn_probe, seed=seed)


@dataclass(frozen=True)
class FilterPolicy:
    """Which checks decide. The default is the product's filter; the other settings exist to
    reproduce the reference recipe (source-only re-ID check, fixed threshold, no floors) and
    measure what it lets through."""

    reid_against: str = "neighbours"  # or "source"
    reid_threshold: float | None = None  # None: the calibrated threshold
    distance_floors: bool = True

    @classmethod
    def from_settings(cls, settings: GenerateConfig) -> FilterPolicy:
        return cls(settings.reid_check, settings.reid_threshold, settings.distance_floors)


@dataclass
class FilterResult:
    """Per-candidate scores, nearest training rows, and the decision of each check.

    `flags` are the decisions under the policy the check ran with; `strict` are those of the
    default policy (all training patients, calibrated threshold, both floors), so a run with a
    weaker policy still records which of its images the product's filter would have rejected.
    """

    reid_score: np.ndarray  # highest score against any training image (the source included)
    reid_source_score: np.ndarray  # score against the source alone (NaN without sources)
    reid_nearest: np.ndarray  # training row the highest score was against
    embedding_distance: np.ndarray
    embedding_nearest: np.ndarray
    pixel_distance: np.ndarray
    pixel_nearest: np.ndarray
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    strict: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rejected(self) -> np.ndarray:
        return np.logical_or.reduce([self.flags[check] for check in CHECKS])

    @property
    def strictly_rejected(self) -> np.ndarray:
        return np.logical_or.reduce([self.strict[check] for check in CHECKS])

    def reason(self, row: int) -> str:
        """The checks that rejected one candidate, joined by '+', or '' when it passed."""
        return "+".join(check for check in CHECKS if self.flags[check][row])

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
    pixel_index: NeighbourIndex  # exact, of the training images' AlignedPixels.reference
    pixels: AlignedPixels
    floors: dict[str, DistanceFloor]
    neighbours: int = 16
    neighbour_threshold: float | None = None  # None: the pair threshold (older calibrations)

    @property
    def any_patient_threshold(self) -> float:
        if self.neighbour_threshold is None:
            return self.reid.scorer.threshold
        return self.neighbour_threshold

    @classmethod
    def load(cls, calibration: Path, embedder: Path, reid: Path, dataset: CanonicalDataset,
             settings: PrivacyConfig, seed: int) -> PrivacyFilter:
        """Build the filter from the folders of calibrate, the embedder and the re-ID network,
        and the prepared dataset whose training images it guards."""
        is_train = dataset.split == "train"
        summary = json.loads((calibration / "floors.json").read_text())
        reid_train = np.load(calibration / "reid_train.npy")
        features = np.load(embedder / "features.npy")[is_train]
        pixels = AlignedPixels.from_settings(settings)
        return cls(
            embedder=load_embedder(embedder),
            reid=load_reid(reid),
            reid_train=reid_train,
            reid_index=_index(settings, "cosine", seed).fit(reid_train),
            embedding_index=_index(settings, "cosine", seed).fit(features),
            pixel_index=pixels.index(dataset.images_float()[is_train]),
            pixels=pixels,
            floors={space: DistanceFloor.from_json(floor)
                    for space, floor in summary["floors"].items()},
            neighbours=settings.reid_neighbours,
            neighbour_threshold=summary.get("reid_neighbour_threshold"))

    def check(self, images: np.ndarray, sources: np.ndarray | None = None,
              policy: FilterPolicy = FilterPolicy(),
              drawn_from_source: np.ndarray | bool = True) -> FilterResult:
        """images: float [M, R, R] in [0, 1]; sources: the training row each was drawn for;
        drawn_from_source: whether each was conditioned on its source's image (its embedding).

        The all-patient score is the highest against the `neighbours` training images nearest
        in re-ID space and the source; the k beyond the first guard against an approximate index
        missing it. A candidate drawn from its source's image also gets the pair threshold
        against that image: it is the one such a candidate would most likely copy. A candidate
        drawn from the labels alone owes its source nothing but the label; that source is one
        training image among those of its class, checked like all of them. Held to the pair
        threshold, which flags most images of two different patients (59% on Kermany, 90% of
        normal films), the release would lose most of the class whose films look alike, and
        would depend on which image happened to lend the label.
        """
        reid_embedding = self.reid.embed(images)
        k = min(self.neighbours, len(self.reid_train))
        cosine_distance, reid_nearest = self.reid_index.search(reid_embedding, k=k)
        best_cosine, nearest = 1.0 - cosine_distance[:, 0], reid_nearest[:, 0].copy()
        source_score = np.full(len(images), np.nan)
        if sources is not None:
            source_cosine = np.einsum("nd,nd->n", reid_embedding, self.reid_train[sources])
            source_score = self.reid.scorer.score(source_cosine)
            use_source = source_cosine >= best_cosine
            best_cosine = np.where(use_source, source_cosine, best_cosine)
            nearest = np.where(use_source, sources, nearest)
        embedding_distance, embedding_nearest = self.embedding_index.search(
            self.embedder.embed(images), k=1)
        # The aligned pixel check compares each candidate with every training image at every
        # shift and mirrored (exact search), so the floor holds against the whole training set,
        # as the distance-safeguard guarantee states it: the whole check takes about 19 ms per
        # candidate at 32 px on 2 cores (benchmarks/filter_cost.py).
        pixel_distance, pixel_nearest = self.pixels.nearest(self.pixel_index, images)
        result = FilterResult(self.reid.scorer.score(best_cosine), source_score, nearest,
                              embedding_distance[:, 0], embedding_nearest[:, 0],
                              pixel_distance, pixel_nearest)
        floors = {space: self.floors[space].flags(distance) for space, distance in
                  (("embedding", result.embedding_distance), ("pixel", result.pixel_distance))}
        linked_to_source = np.nan_to_num(source_score, nan=-1.0) >= self.reid.scorer.threshold
        linked_to_anyone = result.reid_score >= self.any_patient_threshold
        result.strict = {"reid": (linked_to_source & drawn_from_source) | linked_to_anyone,
                         **floors}
        if policy == FilterPolicy():
            result.flags = dict(result.strict)
            return result
        if policy.reid_against == "source" and sources is None:
            raise ValueError("a source-only re-ID check needs the candidates' sources")
        if policy.reid_threshold is None:
            reid_flags = linked_to_source if policy.reid_against == "source" else result.strict["reid"]
        else:
            score = source_score if policy.reid_against == "source" else result.reid_score
            reid_flags = np.nan_to_num(score, nan=-1.0) >= policy.reid_threshold
        no_flags = np.zeros(len(images), dtype=bool)
        result.flags = {"reid": reid_flags,
                        **{space: flags if policy.distance_floors else no_flags
                           for space, flags in floors.items()}}
        return result
