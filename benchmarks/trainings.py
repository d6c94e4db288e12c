"""Figures over several trainings of the whole pipeline: the mean of each finished run's
figure, with an interval that covers both the test patients and the spread between trainings.

    .venv/bin/python benchmarks/trainings.py --name NAME RUN [RUN ...] [--bootstrap 1000]

The runs must share their prepared data (the same test patients) and differ in their seed. For
each training set of the evaluation (real, synthetic, real + synthetic, synthetic then real):
the mean over trainings of each training's seed-mean test ROC-AUC, its 95% interval
(`bootstrap_auc_over_trainings`: trainings and test patients resampled together), every
training's figure, and for the sets other than real the gap to each training's own
real-trained classifiers with its interval. Each training's release audit: its privacy figures,
their means, and how many trainings passed every verdict. Writes
`benchmarks/results/trainings-NAME.json`; `kermany.py --trainings` uses the same function.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from runner import provenance
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.evaluate import TRAINING_SET_TITLES, TRAINING_SETS
from unpersonal.metrics.auc import bootstrap_auc_over_trainings
from unpersonal.report.summary import release_verdicts
from unpersonal.rundir import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def _read(run: Path, stage: str, name: str) -> dict[str, Any]:
    return json.loads((run / stage / name).read_text())


def over_trainings(runs: list[Path], bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The runs' figures averaged over trainings, with intervals (see the module docstring)."""
    dataset = load_canonical(runs[0] / "prepare")
    test = dataset.subset("test")
    saved = [np.load(run / "eval" / "test_probs.npz") for run in runs]
    labels = saved[0]["labels"]
    if len(labels) != len(test) or any(not np.array_equal(s["labels"], labels) for s in saved):
        raise SystemExit("the runs do not share their test split: prepare them from the same data")
    metrics = [_read(run, "eval", "metrics.json") for run in runs]
    privacy = [_read(run, "audit", "privacy.json") for run in runs]
    seeds = min(s["real"].shape[0] for s in saved)
    real = np.stack([s["real"][:seeds] for s in saved])
    sets: dict[str, Any] = {}
    for name in TRAINING_SETS:
        if not all(name in s.files for s in saved):
            continue
        probs = np.stack([s[name][:seeds] for s in saved])
        per_training = [m["utility"]["classification"][name]["mean"] for m in metrics]
        low, high = bootstrap_auc_over_trainings(labels, probs, dataset.label_kind, n=bootstrap,
                                                 seed=seed, groups=test.patient_id)
        figures = {"title": TRAINING_SET_TITLES[name], "auc": float(np.mean(per_training)),
                   "auc_ci95": [low, high], "auc_per_training": per_training}
        if name != "real":
            suffix = "" if name == "synthetic" else f"_{name}"
            gaps = [m["utility"]["classification"][f"gap_pp{suffix}"] for m in metrics]
            gap_low, gap_high = bootstrap_auc_over_trainings(
                labels, probs, dataset.label_kind, n=bootstrap, seed=seed,
                groups=test.patient_id, baseline=real)
            figures |= {"gap_pp": float(np.mean(gaps)), "gap_pp_per_training": gaps,
                        "gap_pp_ci95": [100 * gap_low, 100 * gap_high]}
        sets[name] = figures
    verdicts = [[v.to_json() for v in release_verdicts(m, p)] for m, p in zip(metrics, privacy)]
    audits = [all(v["passed"] is not False for v in training[1:]) for training in verdicts]
    return {"trainings": [run.name for run in runs], "classifier_seeds": seeds,
            "test_images": len(test), "test_patients": int(len(np.unique(test.patient_id))),
            "training_sets": sets,
            "privacy": {
                "reid_rate_synthetic": _mean_of([p["reid_rate"]["synthetic"] for p in privacy]),
                "reid_rate_heldout": _mean_of([p["reid_rate"]["heldout"] for p in privacy]),
                "mia_auc": _mean_of([max(p["membership_inference"][a]["auc"]
                                         for a in ("distance", "density_ratio"))
                                     for p in privacy]),
                "pso_excess": _mean_of([p["singling_out"]["max_excess"] for p in privacy]),
                "pso_excess_ci_per_training": [p["singling_out"]["max_ci"] for p in privacy]},
            "audits_passed": sum(audits), "audit_passed_per_training": audits,
            "verdicts_per_training": verdicts}


def _mean_of(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "per_training": values}


def markdown(summary: dict[str, Any]) -> str:
    trainings = len(summary["trainings"])
    lines = [f"| classifier trained on | mean test ROC-AUC over {trainings} trainings (95% CI) | "
             "per training | gap to real, pp (95% CI) | gap per training |",
             "|---|---:|---|---:|---|"]
    for figures in summary["training_sets"].values():
        low, high = figures["auc_ci95"]
        each = ", ".join(f"{auc:.3f}" for auc in figures["auc_per_training"])
        gap = gaps = ""
        if "gap_pp" in figures:
            gap_low, gap_high = figures["gap_pp_ci95"]
            gap = f"{figures['gap_pp']:+.2f} ({gap_low:+.2f} to {gap_high:+.2f})"
            gaps = ", ".join(f"{g:+.2f}" for g in figures["gap_pp_per_training"])
        lines.append(f"| {figures['title']} | {figures['auc']:.3f} ({low:.3f}-{high:.3f}) | "
                     f"{each} | {gap} | {gaps} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="results go to trainings-NAME.json")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("runs", type=Path, nargs="+")
    options = parser.parse_args()
    summary = over_trainings(options.runs, options.bootstrap)
    write_atomic(ROOT / "benchmarks" / "results" / f"trainings-{options.name}.json",
                 json.dumps({**provenance(), **summary}, indent=2) + "\n")
    print(markdown(summary))
    print(f"audits passed: {summary['audits_passed']} of {len(options.runs)}")


if __name__ == "__main__":
    main()
