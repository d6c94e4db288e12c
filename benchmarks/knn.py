"""kNN query for 100k training embeddings and 10k candidates: exact vs approximate vs torch cdist.

    .venv/bin/python benchmarks/knn.py      # -> benchmarks/results/knn.json

Three ways to find each candidate's nearest training embeddings (cosine metric, dim 128):
  exact   NeighbourIndex with exact_max above N: a FAISS flat inner-product index;
  approx  NeighbourIndex with its defaults for N = 100k: IVF, ~4 sqrt(N) lists, probe 16;
  cdist   the plain baseline: torch.cdist on unit vectors + topk, 512 candidates at a time.
Query seconds are the median of 3 repeats for each k in (1, 10), the order of the methods
rotating between repeats so that load from other jobs on the machine hits all of them alike.
Recall@k of approx is the share of the exact k nearest it returns.

The data is synthetic, and clustered on purpose: uniformly random vectors in 128 dimensions
have no structure for an IVF index to exploit (every cell boundary cuts through the neighbours),
while real embeddings of medical images crowd around a few anatomies, views and findings. The
vectors here are a mixture of 100 anisotropic Gaussians on the unit sphere (uneven cluster
sizes; most of each cluster's spread in its own 16-dimensional subspace), renormalised. The
uniform-sphere worst case is measured too and reported under details.uniform_sphere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

from unpersonal.privacy.knn import NeighbourIndex

ROOT = Path(__file__).resolve().parents[1]
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def clustered_sphere(count: int, dim: int, clusters: int, rank: int, seed: int) -> np.ndarray:
    """Unit vectors from a mixture of anisotropic Gaussians around random directions."""
    rng = np.random.default_rng(seed)
    layout = np.random.default_rng(1000)  # the same clusters for training set and candidates
    centres = _unit(layout.normal(size=(clusters, dim)))
    bases = layout.normal(size=(clusters, rank, dim)) / np.sqrt(dim)  # each cluster's subspace
    spreads = layout.uniform(0.6, 1.2, size=clusters)
    weights = layout.dirichlet(np.ones(clusters))
    members = rng.choice(clusters, size=count, p=weights)
    along = np.einsum("nr,nrd->nd", rng.normal(size=(count, rank)), bases[members])
    noise = 0.03 * rng.normal(size=(count, dim))
    vectors = centres[members] + spreads[members, None] * along + noise
    return _unit(vectors).astype(np.float32)


def uniform_sphere(count: int, dim: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).normal(size=(count, dim))).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cdist_search(train: torch.Tensor, chunk: int) -> Search:
    """Brute force in torch: euclidean distances on unit vectors rank exactly as cosine does."""
    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found_distances, found_indices = [], []
        for start in range(0, len(queries), chunk):
            block = torch.from_numpy(queries[start:start + chunk])
            distances, indices = torch.cdist(block, train).topk(k, dim=1, largest=False)
            found_distances.append(distances.square() / 2)  # |a - b|^2 / 2 = 1 - cos
            found_indices.append(indices)
        return torch.cat(found_distances).numpy(), torch.cat(found_indices).numpy()
    return search


def build(train: np.ndarray, probe: int, cdist_chunk: int) -> tuple[dict[str, Search], dict]:
    """Each method ready to query, and how long getting it ready took."""
    searches, info = {}, {}
    start = time.perf_counter()
    exact = NeighbourIndex("cosine", exact_max=len(train)).fit(train)
    info["exact"] = {"build_s": round(time.perf_counter() - start, 3), "kind": exact.kind}
    start = time.perf_counter()
    approx = NeighbourIndex("cosine", probe=probe).fit(train)
    info["approx"] = {"build_s": round(time.perf_counter() - start, 3), "kind": approx.kind,
                      "lists": approx.lists_used, "probe": approx.probe}
    start = time.perf_counter()
    train_tensor = torch.from_numpy(train).contiguous()
    info["cdist"] = {"build_s": round(time.perf_counter() - start, 3), "chunk": cdist_chunk}
    searches["exact"], searches["approx"] = exact.search, approx.search
    searches["cdist"] = cdist_search(train_tensor, cdist_chunk)
    return searches, info


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true k nearest that were returned."""
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(t)) / k for a, t in zip(found, truth)]))


def time_queries(searches: dict[str, Search], queries: np.ndarray, ks: tuple[int, ...],
                 repeats: int) -> tuple[dict, dict]:
    """Median query seconds per method and k (order rotating per repeat), and the last results."""
    names = list(searches)
    seconds = {name: {k: [] for k in ks} for name in names}
    results: dict[str, dict[int, np.ndarray]] = {name: {} for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for k in ks:
            for name in order:
                start = time.perf_counter()
                _, indices = searches[name](queries, k)
                seconds[name][k].append(time.perf_counter() - start)
                results[name][k] = indices
    return seconds, results


def measure(train: np.ndarray, queries: np.ndarray, ks: tuple[int, ...], repeats: int,
            probe: int, cdist_chunk: int) -> dict:
    searches, info = build(train, probe, cdist_chunk)
    seconds, results = time_queries(searches, queries, ks, repeats)
    for name in searches:
        info[name]["query_s"] = {f"k{k}": round(statistics.median(seconds[name][k]), 4)
                                 for k in ks}
        info[name]["query_s_all_repeats"] = {f"k{k}": [round(s, 4) for s in seconds[name][k]]
                                             for k in ks}
    for name in ("approx", "cdist"):
        info[name]["recall_vs_exact"] = {f"at{k}": round(recall(results[name][k],
                                                                results["exact"][k]), 4)
                                         for k in ks}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", type=int, default=16)
    parser.add_argument("--cdist-chunk", type=int, default=512)
    parser.add_argument("--skip-uniform", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "knn.json")
    options = parser.parse_args()
    ks = (1, 10)
    started, load_before = time.perf_counter(), os.getloadavg()

    train = clustered_sphere(options.train, options.dim, clusters=100, rank=16, seed=0)
    queries = clustered_sphere(options.queries, options.dim, clusters=100, rank=16, seed=1)
    clustered = measure(train, queries, ks, options.repeats, options.probe, options.cdist_chunk)
    nearest, _ = NeighbourIndex("cosine", exact_max=len(train)).fit(train).search(queries, 1)
    clustered["nearest_cosine_distance"] = {
        q: round(float(np.quantile(nearest[:, 0], p)), 4)
        for q, p in (("q01", 0.01), ("median", 0.5), ("q99", 0.99))}
    print(json.dumps({"clustered": clustered}), flush=True)
    details = {"data": "clustered: mixture of 100 anisotropic Gaussians on the unit sphere "
                       "(16-dim spread per cluster, Dirichlet cluster sizes); candidates drawn "
                       "from the same mixture",
               "metric": "cosine", "n_train": options.train, "n_queries": options.queries,
               "dim": options.dim, "ks": list(ks), "repeats": options.repeats,
               "clustered": clustered}
    if not options.skip_uniform:
        uniform = measure(uniform_sphere(options.train, options.dim, seed=2),
                          uniform_sphere(options.queries, options.dim, seed=3), ks,
                          options.repeats, options.probe, options.cdist_chunk)
        details["uniform_sphere"] = uniform
        print(json.dumps({"uniform_sphere": uniform}), flush=True)

    result = {
        "knn_seconds_exact": clustered["exact"]["query_s"]["k10"],
        "knn_seconds_approx": clustered["approx"]["query_s"]["k10"],
        "knn_recall_approx": clustered["approx"]["recall_vs_exact"]["at10"],
        "knn_seconds_cdist": clustered["cdist"]["query_s"]["k10"],
        "knn_seconds_meaning": f"seconds to query {options.queries} candidates for their 10 "
                               f"nearest of {options.train} (median of {options.repeats})",
        "details": details,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))}-core CPU shared with "
                   f"other jobs (load average {load_before[0]:.1f} at start, "
                   f"{os.getloadavg()[0]:.1f} at end), faiss {faiss.__version__} "
                   f"({faiss.omp_get_max_threads()} threads), torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/knn.py",
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
