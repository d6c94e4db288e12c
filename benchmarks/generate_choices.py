"""What each generation choice costs: selection mode, solver steps, guidance.

    .venv/bin/python benchmarks/generate_choices.py     # after benchmarks/generate.py

On the trained run of benchmarks/generate.py (runs/bench-kermany-32), runs `unpersonal generate`
on the first `--sources` sources once per choice below, each in its own copy of the run, and
records acceptance, rejections by check, candidates per source, NFE and seconds per accepted
image, and the utility of what it accepted: a classifier trained on that set (over `--seeds`
training seeds) tested on the real test split, beside one trained on the real images of the same
sources (same size, same settings), so a choice that accepts fewer images pays for it here.
Writes benchmarks/results/generate_choices.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from runner import copy_run_without, sets, unpersonal
from unpersonal.config import Config, load_config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.metrics.auc import roc_auc_per_class
from unpersonal.sampling.schedule import source_indices
from unpersonal.training.classifier import fit_classifier

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHOICES = {
    "cpu preset (first, K=8, 2 attempts, DPM++ 10 steps, labels only: w=0, label gate)": (),
    "3 attempts": ("generate.attempts=3",),
    "DPM++ 16 steps": ("sampling.steps=16",),
    "best of K=8": ("generate.mode=best",),
    "no label gate": ("generate.label_gate=false",),
    "source embedding at w=1, no back-off": ("generate.guidance=1.0",
                                              "generate.guidance_floor=1.0"),
    "source embedding at w=0.5, no back-off": ("generate.guidance=0.5",
                                               "generate.guidance_floor=0.5"),
}
FIELDS = ("sources", "acceptance_rate", "candidate_pass_rate", "rejections_by_reason",
          "candidates_per_source_mean", "attempts_per_source_mean", "nfe_per_accepted",
          "seconds_per_accepted", "skipped_sources")


def utility(config: Config, dataset: CanonicalDataset, images: np.ndarray, labels: np.ndarray,
            seeds: int) -> dict[str, float | list[float]]:
    """Test ROC-AUC (macro mean) of classifiers trained on `images`, one per seed."""
    val, test = dataset.subset("val"), dataset.subset("test")
    val_images, test_images = val.images_float(), test.images_float()
    scores = []
    for seed in range(seeds):
        classifier = fit_classifier(images, labels, dataset.label_kind, config.classifier,
                                    config.seed + seed, val_images, val.labels,
                                    progress=None, label_names=dataset.label_names)
        probs = classifier.predict_proba(test_images)
        scores.append(roc_auc_per_class(test.labels, probs, test.label_kind,
                                        test.label_names)["mean"])
    return {"auc": float(np.mean(scores)), "auc_per_seed": scores, "images": len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="classifier training seeds")
    options = parser.parse_args()
    if not (options.run / "fit-diffusion" / "model.json").is_file():
        sys.exit(f"{options.run} has no trained model: run benchmarks/generate.py first")
    copy = options.run.with_name(options.run.name + "-choices")
    dataset = load_canonical(options.run / "prepare")
    train = dataset.subset("train")
    config = load_config(config_file=options.run / "config.yaml")
    same_sources = source_indices(config.seed, options.sources, len(train))
    real = utility(config, dataset, train.images_float()[same_sources],
                   train.labels[same_sources], options.seeds)
    print("real images of the same sources", json.dumps(real), flush=True)
    results = {}
    for name, overrides in CHOICES.items():
        copy_run_without(options.run, copy)
        wall = unpersonal("generate", "--out", str(copy),
                          *sets(*overrides, f"generate.count={options.sources}"))
        summary = json.loads((copy / "generate" / "generate.json").read_text())
        accepted = read_synthetic_set(copy / "generate" / "synthetic", dataset.label_names)
        results[name] = {"overrides": list(overrides), "wall_s": wall,
                         **{field: summary[field] for field in FIELDS},
                         "utility": utility(config, dataset, accepted.images, accepted.labels,
                                            options.seeds)}
        print(name, json.dumps(results[name]), flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    out = {"choices": results, "real_same_sources": real, "classifier_seeds": options.seeds,
           "machine": f"{platform.machine()}, 2-core CPU",
           "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/generate_choices.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generate_choices.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
