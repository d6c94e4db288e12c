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

import csv
import json
from pathlib import Path

import numpy as np

from runner import EvaluatedRun, parser_beside_run, provenance
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def logged_divergence(run: Path) -> dict[str, float]:
    """Each released file's label divergence, from generate's decision log."""
    with open(run / "generate" / "decisions.csv", newline="") as handle:
        return {row["synthetic_file"]: float(row["divergence"]) for row in csv.DictReader(handle)
                if row["outcome"].startswith("accepted")}


def main() -> None:
    parser = parser_beside_run(__doc__.splitlines()[0])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.1, 0.2])
    options = parser.parse_args()
    evaluated = EvaluatedRun.load(options.run, options.seeds)
    released = read_synthetic_set(evaluated.run.stage_path("generate") / "synthetic",
                                  evaluated.dataset.label_names)
    logged = logged_divergence(options.run)
    divergence = np.array([logged[name] for name in released.names])
    results = {}
    for tolerance in sorted(options.tolerances):
        kept = divergence <= tolerance
        results[f"{tolerance:g}"] = {
            "tolerance": tolerance, "images": int(kept.sum()), "of": len(kept),
            "label_share": released.labels[kept].mean(axis=0).round(4).tolist(),
            **evaluated.score(released.images[kept], released.labels[kept])}
        print(json.dumps(results[f"{tolerance:g}"]), flush=True)
    out = {"tolerances": results, "classifier_seeds": options.seeds,
           "released_tolerance": evaluated.config.generate.tolerance,
           **provenance()}
    write_atomic(RESULTS / "label_tolerance.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
