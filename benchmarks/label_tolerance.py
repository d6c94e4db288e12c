"""Would a stricter label gate help? The released set kept at smaller label divergences.

    .venv/bin/python benchmarks/label_tolerance.py --tolerances 0.1 0.2   # after kermany.py

`generate` keeps a survivor only when the filter's classifier reads its source's labels in it
within `generate.tolerance` (symmetric KL, 0.5 at the cpu preset). Here the released set of
runs/bench-kermany-32 is cut to the images whose logged divergence is within each smaller
tolerance and evaluated as `unpersonal evaluate` would (classifiers over `--seeds` seeds,
fidelity in the audit embedder's space), beside the run's own real-trained classifiers. A
stricter `generate.tolerance` would draw new candidates for the images cut here; this asks,
first and for the cost of the classifiers alone, whether the images it keeps train better.
Writes benchmarks/results/label_tolerance.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from runner import cores
from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.evaluate import evaluate_set
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import RunDir, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def logged_divergence(run: Path) -> dict[str, float]:
    """Each released file's label divergence, from generate's decision log."""
    with open(run / "generate" / "decisions.csv", newline="") as handle:
        return {row["synthetic_file"]: float(row["divergence"]) for row in csv.DictReader(handle)
                if row["outcome"].startswith("accepted")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32",
                        help="the evaluated run of benchmarks/kermany.py")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=5, help="classifier training seeds")
    options = parser.parse_args()
    probs_file = options.run / "eval" / "test_probs.npz"
    if not probs_file.is_file():
        sys.exit("run benchmarks/kermany.py first")
    run = RunDir(options.run)
    config = load_config(config_file=options.run / "config.yaml")
    config.evaluate.classifier_seeds = options.seeds
    config.evaluate.restoration = False
    config.evaluate.real_plus_synthetic = False
    dataset = load_canonical(run.stage_path("prepare"))
    released = read_synthetic_set(run.stage_path("generate") / "synthetic", dataset.label_names)
    divergence = np.array([logged_divergence(options.run)[name] for name in released.names])
    with np.load(probs_file) as saved:
        real_probs = saved["real"][:options.seeds]
    results = {}
    for tolerance in sorted(options.tolerances):
        kept = divergence <= tolerance
        metrics, _ = evaluate_set(config, run, dataset, released.images[kept],
                                  released.labels[kept], real_probs=real_probs)
        classification = metrics["utility"]["classification"]
        results[f"{tolerance:g}"] = {
            "tolerance": tolerance, "images": int(kept.sum()), "of": len(kept),
            "label_share": released.labels[kept].mean(axis=0).round(4).tolist(),
            "auc": classification["synthetic"]["mean"],
            "auc_ci": classification["synthetic"]["ci95"],
            "auc_per_seed": classification["synthetic"]["per_seed"],
            "auc_real": classification["real"]["mean"], "gap_pp": classification["gap_pp"],
            "gap_pp_ci": classification["gap_pp_ci95"], "fd": metrics["fidelity"]["fd"],
            "coverage": metrics["fidelity"]["prdc"]["coverage"]}
        print(json.dumps(results[f"{tolerance:g}"]), flush=True)
    out = {"tolerances": results, "classifier_seeds": options.seeds,
           "released_tolerance": config.generate.tolerance,
           "machine": f"{platform.machine()}, {cores()} cores", "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/label_tolerance.py " + " ".join(sys.argv[1:])}
    write_atomic(RESULTS / "label_tolerance.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
