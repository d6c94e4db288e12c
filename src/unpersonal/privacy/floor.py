"""The calibrated distance floor: how close to a training image a released image may come.

A held-out patient's image is, by construction, not a copy of any training image, yet it has a
nearest training image at some distance. Over many held-out images those distances show how
close two different patients' images naturally come. A candidate closer to some training image
than almost all held-out images are (below their `quantile` quantile) is treated as a possible
copy and rejected:

    floor = quantile_q { min_j d(h, t_j) : h held out }        flag(c) = min_j d(c, t_j) < floor

The same rule serves two spaces: the embedder's unit-norm features with cosine distance, and
pixels with per-pixel RMSE (`pixel_vectors` scales them so that the euclidean distance is RMSE).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from unpersonal.errors import UserError
from unpersonal.privacy.knn import METRICS, Metric, NeighbourIndex

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

    Use this directly when a training index already exists (search the held-out vectors with
    k=1 and pass column 0). Quantile 0 gives the held-out minimum; since flagging is strict (<),
    no held-out image is then flagged.
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


def calibrate_floor(train_vectors: np.ndarray, heldout_vectors: np.ndarray, quantile: float,
                    metric: Metric, *, exact_max: int = 50_000, lists: int | None = None,
                    probe: int = 16, seed: int = 0) -> DistanceFloor:
    """Index the training vectors, find each held-out vector's nearest one, take the quantile.

    An approximate index (above `exact_max` training vectors) can miss the true nearest image,
    which only lengthens held-out distances: the floor then errs on the strict side.
    """
    if len(heldout_vectors) == 0:
        raise UserError("the distance floor needs held-out images (a validation or test split) "
                        "to calibrate against; this dataset has none")
    index = NeighbourIndex(metric, exact_max=exact_max, lists=lists, probe=probe,
                           seed=seed).fit(train_vectors)
    distances, _ = index.search(heldout_vectors, k=1)
    return floor_from_distances(distances[:, 0], quantile, metric)


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Images [N, H, W] in [0, 1] -> [N, H*W] float32 scaled by 1/sqrt(H*W).

    The euclidean distance between two rows is then sqrt(mean squared pixel difference): the
    per-pixel RMSE, on the same [0, 1] scale at every resolution.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]  # [N, 1, H, W] as the networks see them
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1] (see images_float()), "
                         f"got {images.dtype}")
    count, height, width = images.shape
    scaled = images.reshape(count, height * width).astype(np.float32)
    return scaled / np.float32(np.sqrt(height * width))
