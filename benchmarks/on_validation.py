"""Score finished runs' releases on the validation split, to choose between their settings.

    .venv/bin/python benchmarks/on_validation.py --name demo-size runs/demo-a runs/demo-b

The protocol (BENCHMARKS.md, top) chooses every setting on the validation split; the test split
reports the chosen one once. For each run this trains the run's classifier on its released set
(and reuses the run's real-trained one), measures both on the validation split with the run's
audit embedder for fidelity, and adds the audit's verdict, which needs no test images
(`--all-rows`: real + synthetic and synthetic-then-real too). Results:
benchmarks/results/validation-NAME.json, one entry per run with its config's differences from
the first run.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.evaluate import TRAINING_SETS
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages.evaluate import evaluate_run_set

ROOT = Path(__file__).resolve().parents[1]


def score(run: Path, seeds: int, rows: bool) -> dict[str, Any]:
    """The release's validation figures and its audit's verdict (`rows`: also real + synthetic
    and synthetic then real)."""
    config = load_config(config_file=run / "config.yaml").model_copy(deep=True)
    config.evaluate.restoration = False
    config.evaluate.classifier_seeds = seeds
    config.evaluate.real_plus_synthetic = rows
    config.evaluate.pretrain_finetune = rows
    dataset = load_canonical(run / "prepare")
    released = read_synthetic_set(run / "generate" / "synthetic", dataset.label_names)
    metrics, _ = evaluate_run_set(config, RunDir(run), dataset, released.images,
                                  released.labels, split="val")
    classes = metrics["utility"]["classification"]
    privacy = json.loads((run / "audit" / "privacy.json").read_text())
    failed = [name for name, test in privacy["tests"]["by_figure"].items() if test["rejected"]]
    return {"run": run.name, "config": config.model_dump(mode="json"),
            "validation_images": classes["test_images"],
            "auc": {name: classes[name]["mean"] for name in TRAINING_SETS if name in classes},
            "auc_ci": {name: classes[name]["ci95"] for name in TRAINING_SETS if name in classes},
            "gap_pp": classes["gap_pp"], "gap_pp_ci": classes["gap_pp_ci95"],
            "fd": metrics["fidelity"]["fd"], "coverage": metrics["fidelity"]["prdc"]["coverage"],
            "audit_passed": privacy["tests"]["passed"], "audit_failed": failed}


def differences(base: dict[str, Any], other: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config fields where `other` differs from `base`, dotted."""
    out: dict[str, Any] = {}
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out |= differences(base[key], value, f"{prefix}{key}.")
        elif base.get(key) != value:
            out[f"{prefix}{key}"] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--seeds", type=int, default=1, help="classifier training seeds")
    parser.add_argument("--all-rows", action="store_true",
                        help="also real + synthetic and synthetic then real (3x the classifiers)")
    options = parser.parse_args()
    missing = [run for run in options.runs if not (run / "audit" / "privacy.json").is_file()]
    if missing:
        sys.exit(f"{missing[0]}: no audit yet; run `unpersonal run` there first")
    rows = [score(run, options.seeds, options.all_rows) for run in options.runs]
    for row in rows[1:]:
        row["differs_from_first"] = differences(rows[0]["config"], row["config"])
    for row in rows:
        del row["config"]
        print(f"{row['run']}: synthetic {row['auc']['synthetic']:.3f}, real "
              f"{row['auc']['real']:.3f}, gap {row['gap_pp']:+.1f} pp, audit "
              f"{'passes' if row['audit_passed'] else 'fails ' + ', '.join(row['audit_failed'])}")
    out = ROOT / "benchmarks" / "results" / f"validation-{options.name}.json"
    write_atomic(out, json.dumps({"date": datetime.now().strftime("%Y-%m-%d"),
                                  "split": "val", "classifier_seeds": options.seeds,
                                  "runs": rows}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
