"""How much of its source patient each pseudo-condition carries into a candidate.

    .venv/bin/python benchmarks/conditions.py --run runs/bench-kermany-32 [--sources 300]

On a trained run (fit-diffusion, fit-reid, calibrate done), draws one candidate for each of
`--sources` training images (the first sources of the run's order, the same noise seeds for
every condition) under each condition below, and measures with the run's filter:

* `source_pass`: the share whose re-ID score against their source image stays below the pair
  threshold (the check a candidate drawn from its source's embedding must pass);
* `linked_to_source_patient`: the share scoring at or above the pair threshold against some
  training image of the source's patient;
* `source_patient_nearest`: the share whose nearest training image in re-ID space is one of
  the source patient's (a pair threshold that flags half of all unrelated pairs says little;
  whether the source's patient is the closest of 3,308 says more);
* `filter_pass`: the share the whole filter lets through, as `generate` would run it for that
  condition (the source check only for candidates drawn from the source's own embedding).

The labels-only condition (w = 0) is one baseline: its candidates owe their source nothing but
the label, so its source figures are what the re-ID network flags between unrelated images of
one class. Real look-alikes are the other: each validation image (a held-out patient) against
its nearest training image with its labels in the embedder's space, the mode a neighbour
condition points at. Writes benchmarks/results/conditions.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from runner import provenance, write_table
from unpersonal.config import load_config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.privacy.filter import PrivacyFilter
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.sampling.sampler import load_sampler
from unpersonal.sampling.schedule import candidate_seed, drawn_from_source, source_indices
from unpersonal.stages.calibrate import load_filter
from unpersonal.torch_utils import pick_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "conditions.json"
# name: (pseudo-condition, neighbours, guidance weight against the labels)
CONDITIONS = {
    "labels only (w=0)": ("source", None, 0.0),
    "source embedding, w=0.5": ("source", None, 0.5),
    "source embedding, w=1": ("source", None, 1.0),
    "8 neighbours of other patients, w=1": ("neighbours", 8, 1.0),
    "32 neighbours of other patients, w=1": ("neighbours", 32, 1.0),
}


def lookalike_pass(run: RunDir, dataset: CanonicalDataset, privacy_filter: PrivacyFilter
                   ) -> dict[str, Any]:
    """How often a held-out patient's image passes the pair check against the training image
    nearest to it (embedder cosine) among those with its labels."""
    features = np.load(run.stage_path("fit-embedder") / "features.npy")
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    is_train, is_val = dataset.split == "train", dataset.split == "val"
    train_labels, val_labels = dataset.labels[is_train], dataset.labels[is_val]
    similarity = features[is_val] @ features[is_train].T
    other_labels = (val_labels[:, None, :] != train_labels[None, :, :]).any(axis=2)
    similarity[other_labels] = -np.inf
    nearest = similarity.argmax(axis=1)
    embedding = privacy_filter.reid.embed(dataset.images_float()[is_val])
    cosine = np.einsum("nd,nd->n", embedding, privacy_filter.reid_train[nearest])
    scores = privacy_filter.reid.scorer.score(cosine)
    return {"images": int(is_val.sum()),
            "source_pass": float(np.mean(scores < privacy_filter.reid.scorer.threshold))}


def measure(run: RunDir, sources: int) -> dict[str, Any]:
    config = load_config(config_file=run.root / "config.yaml")
    dataset = load_canonical(run.stage_path("prepare"))
    train = dataset.subset("train")
    rows = source_indices(config.seed, sources, len(train))
    seeds = [candidate_seed(config.seed, position, 0, 0) for position in range(sources)]
    privacy_filter = load_filter(config, run)
    threshold = privacy_filter.reid.scorer.threshold
    patient_rows = {patient: np.flatnonzero(train.patient_id == patient)
                    for patient in np.unique(train.patient_id[rows])}
    out: dict[str, Any] = {"sources": sources, "pair_threshold": threshold,
                           "heldout_lookalikes": lookalike_pass(run, dataset, privacy_filter)}
    print(f"held-out look-alikes: source pass {out['heldout_lookalikes']['source_pass']:.3f}",
          flush=True)
    for name, (condition, neighbours, weight) in CONDITIONS.items():
        started = time.perf_counter()
        sampler = load_sampler(run.stage_path("fit-diffusion"), train, config.sampling, weight,
                               pick_device(), neighbours=neighbours)
        images = sampler.draw(rows, seeds, weight).images.astype(np.float32)
        images /= float((1 << train.bit_depth) - 1)
        from_source = drawn_from_source(sampler.conditioner.uses_pseudo, config.sampling.guide,
                                        weight, condition)
        checked = privacy_filter.check(images, rows, drawn_from_source=from_source)
        embedding = privacy_filter.reid.embed(images)
        linked = np.array([
            (privacy_filter.reid.scorer.score(
                privacy_filter.reid_train[patient_rows[train.patient_id[row]]] @ vector)
             >= threshold).any() for row, vector in zip(rows, embedding)])
        nearest = np.argmax(embedding @ privacy_filter.reid_train.T, axis=1)
        out[name] = {
            "source_pass": float(np.mean(checked.reid_source_score < threshold)),
            "linked_to_source_patient": float(np.mean(linked)),
            "source_patient_nearest": float(np.mean(train.patient_id[nearest]
                                                    == train.patient_id[rows])),
            "filter_pass": float(np.mean(~checked.rejected)),
            "rejected_by": {check: float(flags.mean()) for check, flags in checked.flags.items()},
            "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name}: source pass {out[name]['source_pass']:.3f}, linked to source patient "
              f"{out[name]['linked_to_source_patient']:.3f}, nearest is the source patient "
              f"{out[name]['source_patient_nearest']:.3f}, filter pass "
              f"{out[name]['filter_pass']:.3f}", flush=True)
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| condition | source pass | linked to the source's patient | nearest is the source's "
             "patient | filter pass |", "|---|---:|---:|---:|---:|"]
    for name in CONDITIONS:
        r = result[name]
        lines.append(f"| {name} | {r['source_pass']:.1%} | {r['linked_to_source_patient']:.1%} | "
                     f"{r['source_patient_nearest']:.1%} | {r['filter_pass']:.1%} |")
    lookalikes = result["heldout_lookalikes"]
    lines.append(f"| real look-alikes: {lookalikes['images']} validation images against their "
                 f"nearest training image with their labels | {lookalikes['source_pass']:.1%} | "
                 "- | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = {**provenance(), "run": args.run.name, **measure(RunDir(args.run), args.sources)}
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    if args.out == DEFAULT_OUT:  # a run written elsewhere leaves BENCHMARKS.md alone
        write_table(ROOT / "BENCHMARKS.md", "conditions.py", table(result))


if __name__ == "__main__":
    main()
