"""Nearest training images for many candidates: a FAISS index that hides its backend.

The privacy filter asks, for every candidate, "which training images are closest, and how close?"
against up to millions of training vectors. Up to `exact_max` vectors a flat index answers
exactly (a blocked matrix multiply); above it an inverted-file (IVF) index clusters the training
vectors into `lists` cells with seeded k-means and scans only the `probe` cells nearest each
query: a little recall traded for a large speed-up (see benchmarks/knn.py for both on this
machine).

Whatever the backend, `search` returns distances a caller can compare with a calibrated floor:

    metric "l2":     |q - x|                     (FAISS gives the square; we take the root)
    metric "cosine": 1 - <q, x> / (|q| |x|)      (FAISS gives the inner product of unit vectors)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from unpersonal.errors import UserError
from unpersonal.rundir import write_atomic

Metric = Literal["l2", "cosine"]
METRICS: tuple[str, ...] = ("l2", "cosine")
FORMAT = "unpersonal.knn/1"

# k-means wants 39..256 training points per cell (FAISS warns outside); 64 keeps training cheap.
TRAIN_POINTS_PER_LIST = 64
MIN_POINTS_PER_LIST = 39
ADD_CHUNK = 65_536  # vectors converted (and normalised) at a time while filling the index


class NeighbourIndex:
    """Exact or IVF nearest-neighbour search over fixed vectors, scikit-learn style.

        index = NeighbourIndex("cosine").fit(train_features)
        distances, indices = index.search(candidate_features, k=16)

    `kind` is "exact" when at most `exact_max` vectors were fitted, else "approximate".
    Queries run in chunks of `query_chunk` rows so that converting (and, for cosine,
    normalising) millions of candidates never needs a second full copy of them.
    """

    def __init__(self, metric: Metric = "l2", exact_max: int = 50_000, lists: int | None = None,
                 probe: int = 16, seed: int = 0, query_chunk: int = 16_384) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if exact_max < 1 or probe < 1 or query_chunk < 1 or (lists is not None and lists < 1):
            raise ValueError("exact_max, lists, probe and query_chunk must be positive")
        self.metric, self.exact_max, self.lists, self.probe = metric, exact_max, lists, probe
        self.seed, self.query_chunk = seed, query_chunk
        self.kind: str | None = None
        self.lists_used: int | None = None
        self._index: faiss.Index | None = None

    # ---- building ----

    def fit(self, vectors: np.ndarray) -> NeighbourIndex:
        vectors = _as_matrix(vectors, "indexed vectors")
        if len(vectors) == 0:
            raise UserError("the nearest-neighbour index needs at least one training vector")
        count, dim = vectors.shape
        if count <= self.exact_max:
            self.kind, self.lists_used = "exact", None
            self._index = _flat(dim, self.metric)
        else:
            self.kind = "approximate"
            self.lists_used = self._lists_for(count)
            self._index = self._trained_ivf(vectors, self.lists_used)
        for start in range(0, count, ADD_CHUNK):  # in chunks: bounded extra memory
            self._index.add(self._prepared(vectors[start:start + ADD_CHUNK]))
        return self

    def _lists_for(self, count: int) -> int:
        """~4 sqrt(N) cells by default, never so many that k-means has too few points per cell."""
        wanted = self.lists if self.lists is not None else round(4 * math.sqrt(count))
        enough_points = max(1, count // MIN_POINTS_PER_LIST)
        return max(1, min(wanted, enough_points if self.lists is None else count))

    def _trained_ivf(self, vectors: np.ndarray, lists: int) -> faiss.Index:
        """IVF cells from seeded k-means on a seeded sample: same data + seed -> same index."""
        quantizer = _flat(vectors.shape[1], self.metric)
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], lists, faiss_metric)
        index.cp.seed = self.seed
        sample_size = min(len(vectors), TRAIN_POINTS_PER_LIST * lists)
        index.cp.max_points_per_centroid = math.ceil(sample_size / lists)  # FAISS must not resample
        rows = np.sort(np.random.default_rng(self.seed).choice(len(vectors), sample_size,
                                                               replace=False))
        index.train(self._prepared(vectors[rows]))
        index.nprobe = min(self.probe, lists)
        return index

    # ---- searching ----

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest indexed vectors of each query: (distances [M, k] float32, indices [M, k]).

        Rows are sorted nearest first. Where fewer than k neighbours exist (k above the index
        size, or an IVF probe that reached fewer vectors) the index is -1 and the distance inf.
        """
        index = self._fitted()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = _as_matrix(queries, "query vectors")
        if queries.shape[1] != index.d:
            raise ValueError(f"query vectors have {queries.shape[1]} dimensions, "
                             f"the index {index.d}")
        distances = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.query_chunk):
            stop = start + self.query_chunk
            raw, found = index.search(self._prepared(queries[start:stop]), k)
            distances[start:stop] = self._true_distances(raw, found)
            indices[start:stop] = found
        return distances, indices

    def _true_distances(self, raw: np.ndarray, found: np.ndarray) -> np.ndarray:
        """FAISS's squared L2 or inner product -> euclidean or cosine distance; inf where none."""
        if self.metric == "l2":
            distances = np.sqrt(np.maximum(raw, 0))
        else:
            distances = np.clip(1 - raw, 0, 2)
        distances[found < 0] = np.inf
        return distances

    def _prepared(self, vectors: np.ndarray) -> np.ndarray:
        """float32, C-contiguous, and unit-norm for cosine (the inner product is then cos)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise UserError("vectors for the nearest-neighbour index contain NaN or inf values")
        if self.metric == "cosine":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            if (norms == 0).any():
                raise UserError(f"{int((norms == 0).sum())} all-zero vectors have no direction "
                                f"for the cosine metric")
            vectors = vectors / norms
        return vectors

    def _fitted(self) -> faiss.Index:
        if self._index is None:
            raise RuntimeError("call fit() (or NeighbourIndex.load) before search()")
        return self._index

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._fitted().d)

    # ---- saving ----

    def settings(self) -> dict[str, object]:
        """Everything but the vectors: the JSON sidecar beside a saved index."""
        return {"format": FORMAT, "metric": self.metric, "kind": self.kind,
                "exact_max": self.exact_max, "lists": self.lists, "lists_used": self.lists_used,
                "probe": self.probe, "seed": self.seed, "query_chunk": self.query_chunk,
                "count": len(self), "dim": self.dim}

    def save(self, path: Path) -> None:
        """Write the FAISS index to `path` and its settings to `path` + ".json", each atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        faiss.write_index(self._fitted(), str(tmp))
        os.replace(tmp, path)
        write_atomic(_sidecar(path), json.dumps(self.settings(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> NeighbourIndex:
        path = Path(path)
        for needed in (path, _sidecar(path)):
            if not needed.is_file():
                raise UserError(f"{needed}: nearest-neighbour index file missing; rebuild it")
        settings = json.loads(_sidecar(path).read_text())
        if settings.get("format") != FORMAT:
            raise UserError(f"{_sidecar(path)}: not an unpersonal index ({settings.get('format')})")
        loaded = cls(settings["metric"], settings["exact_max"], settings["lists"],
                     settings["probe"], settings["seed"], settings["query_chunk"])
        loaded.kind, loaded.lists_used = settings["kind"], settings["lists_used"]
        loaded._index = faiss.read_index(str(path))
        if loaded._index.ntotal != settings["count"] or loaded._index.d != settings["dim"]:
            raise UserError(f"{path}: index and {_sidecar(path).name} disagree; rebuild the index")
        if loaded.kind == "approximate":
            faiss.extract_index_ivf(loaded._index).nprobe = min(loaded.probe, loaded.lists_used)
        return loaded


def _flat(dim: int, metric: str) -> faiss.Index:
    return faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)


def _as_matrix(vectors: np.ndarray, what: str) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"{what} must be a [N, D] array with D > 0, got shape {vectors.shape}")
    return vectors


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")
