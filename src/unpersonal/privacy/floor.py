"""The calibrated distance floor: how close to a training image a released image may come.

A held-out patient's image is, by construction, not a copy of any training image, yet it has a
nearest training image at some distance. Over many held-out images those distances show how
close two different patients' images naturally come. A candidate closer to some training image
than almost all held-out images are (below their `quantile` quantile) is treated as a possible
copy and rejected:

    floor = quantile_q { min_j d(h, t_j) : h held out }        flag(c) = min_j d(c, t_j) < floor

The same rule serves two spaces: the embedder's unit-norm features with cosine distance, and
pixels aligned and standardised (`AlignedPixels`), where the distance is one minus the best
correlation over small shifts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage

from unpersonal.config import PrivacyConfig
from unpersonal.errors import UserError
from unpersonal.privacy.knn import METRICS, Metric, NeighbourIndex

# Query rows (shifted views) per search in `AlignedPixels.nearest`: 8,192 crops of 26 x 26 px
# hold 22 MB, whatever the number of images searched.
SEARCH_ROWS = 8192
SUMMARY_QUANTILES = {"q01": 0.01, "q05": 0.05, "q10": 0.10, "q25": 0.25, "median": 0.5,
                     "q75": 0.75}


@dataclass(frozen=True)
class DistanceFloor:
    """A floor and the held-out evidence behind it (what the audit report shows)."""

    metric: Metric
    quantile: float
    value: float
    n_heldout: int
    heldout_summary: dict[str, float] = field(default_factory=dict)

    def flags(self, distances: np.ndarray | float) -> np.ndarray:
        """True where a nearest-training distance is below the floor: a possible copy."""
        return np.asarray(distances) < self.value

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> DistanceFloor:
        return cls(metric=data["metric"], quantile=float(data["quantile"]),
                   value=float(data["value"]), n_heldout=int(data["n_heldout"]),
                   heldout_summary={k: float(v) for k, v in dict(data["heldout_summary"]).items()})


def floor_from_distances(nearest: np.ndarray, quantile: float, metric: Metric) -> DistanceFloor:
    """The floor from held-out images' distances to their nearest training image.

    `calibrate` searches the held-out vectors in an index of the training vectors and passes each
    one's nearest distance. An approximate index can miss the true nearest image, which only
    lengthens held-out distances: the floor then errs on the strict side. Quantile 0 gives the
    held-out minimum; since flagging is strict (<), no held-out image is then flagged.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not 0 <= quantile < 1:
        raise UserError(f"the distance floor quantile must be in [0, 1), got {quantile}")
    nearest = np.asarray(nearest, dtype=np.float64).reshape(-1)
    if len(nearest) == 0:
        raise UserError("the distance floor needs held-out images (a validation or test split) "
                        "to calibrate against; this dataset has none")
    if not np.isfinite(nearest).all():
        raise ValueError("some held-out images found no training neighbour (distance inf)")
    summary = {"min": float(nearest.min()), "max": float(nearest.max()),
               "mean": float(nearest.mean())}
    summary |= {name: float(np.quantile(nearest, q)) for name, q in SUMMARY_QUANTILES.items()}
    return DistanceFloor(metric=metric, quantile=float(quantile),
                         value=float(np.quantile(nearest, quantile)), n_heldout=len(nearest),
                         heldout_summary=summary)


@dataclass(frozen=True)
class AlignedPixels:
    """Pixel space in which a shifted, re-exposed, re-contrasted or slightly noisy copy of an
    image is still next to its original.

    A memorising generator trained with shift augmentation returns its training images shifted
    by a few pixels, and exposure drifts; per-pixel RMSE calls such copies far apart (on Kermany
    at 32 px it caught 7% of copies shifted by 1 to 3 pixels). Here each image is

    1. brought down to at most `resolution` px (area averaging), so the cost and the shift range,
       as a share of the field, are the same at every input size;
    2. smoothed (Gaussian, `smooth` px), so that pixel noise does not hide a copy;
    3. cropped to its centre, `max_shift` px in from each edge, and standardised (zero mean, unit
       norm), so brightness and contrast do not count.

    A query is compared at every shift of its crop window (`shifted`), and, with `mirror`, its
    left-right mirror image too; its distance is the smallest over them: 1 - the best Pearson
    correlation, 0 for a shifted or mirrored copy, 0.03 to 0.2 between two patients' chest
    films at 32 px. A chest film is not left-right symmetric (the heart is on one side), so a
    mirrored film is still its patient's anatomy: without the mirror the check passed 98% of
    mirrored copies of Kermany training images (benchmarks/leaks.py). `nearest` compares with
    every indexed training image (49 shifts, twice with the mirror, x all images: the filter's
    whole check takes about 19 ms per candidate at 32 px on 2 cores, benchmarks/filter_cost.py),
    in the filter, its calibration and the audit alike.
    """

    max_shift: int = 3
    smooth: float = 0.7
    resolution: int = 32
    mirror: bool = True

    @classmethod
    def from_settings(cls, settings: PrivacyConfig) -> AlignedPixels:
        return cls(settings.pixel_max_shift, settings.pixel_smooth, settings.pixel_resolution,
                   settings.pixel_mirror)

    def index(self, images: np.ndarray) -> NeighbourIndex:
        """An exact cosine index of the images' `reference` vectors, for `nearest`: exact
        at any size (an approximate index could miss the near-copy the floor exists to catch;
        the cost grows with the training set, benchmarks/filter_cost.py)."""
        return NeighbourIndex("cosine", exact_max=sys.maxsize).fit(self.reference(images))

    def reference(self, images: np.ndarray) -> np.ndarray:
        """Unit vectors [N, D] of the training images' central crops, for a cosine index."""
        prepared = self._prepare(images)
        side, margin = prepared.shape[1], self.max_shift
        return _standardised(prepared[:, margin:side - margin, margin:side - margin])

    def shifted(self, images: np.ndarray) -> Iterator[np.ndarray]:
        """The queries' crops at every shift within `max_shift` (and of their mirror images,
        with `mirror`), each [M, D] like `reference`; one at a time, so a large set never holds
        all (2 max_shift + 1)^2 copies."""
        prepared = self._prepare(images)
        side, margin = prepared.shape[1], self.max_shift
        offsets = range(-margin, margin + 1)
        for view in (prepared, prepared[:, :, ::-1]) if self.mirror else (prepared,):
            for dy in offsets:
                for dx in offsets:
                    yield _standardised(view[:, margin + dy:side - margin + dy,
                                             margin + dx:side - margin + dx])

    def nearest(self, index: NeighbourIndex, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image's distance to its nearest indexed training image over all shifts, and
        that image's row (float64 [M], int64 [M]); `index` holds `reference` vectors.

        Every view of a chunk of images goes to the index in one search: an exact search
        reads the whole index (51 MB at 19,000 training images), and view by view a batch of
        candidates read it 98 times. There, one search of 20 candidates' 98 views takes 0.8 s
        against 4.4 s view by view, with the same neighbours (distances equal to 1e-7)."""
        views = (2 if self.mirror else 1) * (2 * self.max_shift + 1) ** 2
        chunk = max(1, SEARCH_ROWS // views)
        best = np.empty(len(images))
        rows = np.empty(len(images), dtype=np.int64)
        for start in range(0, len(images), chunk):
            part = slice(start, start + chunk)
            stacked = np.concatenate(list(self.shifted(images[part])))
            distances, indices = index.search(stacked, k=1)
            distances = distances[:, 0].reshape(views, -1)  # [views, images], view-major
            nearest_view = np.argmin(distances, axis=0)  # the first view on a tie
            columns = np.arange(distances.shape[1])
            best[part] = distances[nearest_view, columns]
            rows[part] = indices[:, 0].reshape(views, -1)[nearest_view, columns]
        return np.maximum(best, 0.0), rows

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        images = _float_images(images)
        side = images.shape[-1]
        if side > self.resolution:
            pooled = torch.nn.functional.adaptive_avg_pool2d(
                torch.from_numpy(images)[:, None], self.resolution)
            images = pooled[:, 0].numpy()
        if images.shape[-1] <= 2 * self.max_shift + 1:
            raise ValueError(f"images of {images.shape[-1]} px are too small for shifts of "
                             f"{self.max_shift} px")
        if self.smooth > 0:
            images = ndimage.gaussian_filter(images, (0, self.smooth, self.smooth), mode="nearest")
        return images


def _float_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]  # [N, 1, H, W] as the networks hold them
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1] (see images_float()), "
                         f"got {images.dtype}")
    return np.ascontiguousarray(images, dtype=np.float32)


def _standardised(crops: np.ndarray) -> np.ndarray:
    """Zero mean, unit norm per row.

    A flat crop has no correlation with anything: it becomes the constant unit vector, which is
    orthogonal to every zero-mean row (distance 1) and gives the cosine index a direction.
    """
    vectors = crops.reshape(len(crops), -1).astype(np.float32)
    vectors = vectors - vectors.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = norms[:, 0] < 1e-6
    vectors = vectors / np.where(flat[:, None], np.float32(1.0), norms)
    vectors[flat] = np.float32(1.0 / np.sqrt(vectors.shape[1]))
    return vectors
