"""Score finished runs' releases on the validation split, to choose between their settings.

    .venv/bin/python benchmarks/on_validation.py --name demo-size runs/demo-a runs/demo-b
    .venv/bin/python benchmarks/on_validation.py --name cpu-conditioning --seeds 3 \
        --variant labels-only:diffusion.conditioning=class \
        runs/bench-kermany-32 runs/bench-kermany-32-t1 runs/bench-kermany-32-t2

The protocol (BENCHMARKS.md, top) chooses every setting on the validation split; the test split
reports the chosen one once. With `--variant NAME:SETTING` (repeated for more settings of one
variant, or for more variants), each run (one training) is first copied to RUN-NAME and its
stages up to the audit brought up to date there under the settings, through the CLI: the stage
keys redo exactly the stages the settings change (resumable; the copy's `eval` is not run, so
no test figure is printed before the choice). Each variant is then scored beside its run, and
summarised over the runs by its mean validation gap and the spread of the paired differences.

For each run this trains the run's classifier on its released set (and reuses the run's
real-trained one), measures both on the validation split with the run's
audit embedder for fidelity, and adds the audit's verdict, which needs no test images
(`--all-rows`: real + synthetic and synthetic-then-real too). Results:
benchmarks/results/validation-NAME.json, one entry per run with its config's differences from
the first run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from runner import sets, unpersonal
from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.evaluate import TRAINING_SETS
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages import commands, pipeline
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


def make_variant(run: Path, name: str, settings: list[str]) -> Path:
    """`run` copied to RUN-NAME (once; a rerun resumes there), its stages up to the audit
    brought up to date under `settings`."""
    copy = run.with_name(f"{run.name}-{name}")
    if not (copy / "manifest.json").is_file():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".work", ".partial"))
    config = load_config(config_file=copy / "config.yaml", overrides=settings)
    needed = {entry.name for entry in pipeline(config)}
    for command, chain in commands().items():  # the registry's order, as `unpersonal run`
        if any(entry.name in needed for entry in chain):
            unpersonal(command, "--out", str(copy), *sets(*settings))
        if command == "audit":
            return copy
    raise AssertionError("the stage registry has no audit command")


def summarise(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Each variant's validation gap over the runs, and its paired difference from the runs'
    own (the same training's privacy models and test patients on both sides)."""
    base = [row for row in rows if row.get("variant") is None]
    out = {}
    for name in variants:
        mine = [row for row in rows if row.get("variant") == name]
        paired = np.array([m["gap_pp"] - b["gap_pp"] for m, b in zip(mine, base)])
        out[name] = {"gap_pp_mean": float(np.mean([row["gap_pp"] for row in mine])),
                     "base_gap_pp_mean": float(np.mean([row["gap_pp"] for row in base])),
                     "paired_difference_pp": paired.round(2).tolist(),
                     "paired_difference_pp_mean": float(paired.mean()),
                     "paired_difference_pp_sd": float(paired.std(ddof=1)) if len(paired) > 1
                     else None,
                     "audits_passed": sum(row["audit_passed"] for row in mine),
                     "runs": len(mine)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--seeds", type=int, default=1, help="classifier training seeds")
    parser.add_argument("--all-rows", action="store_true",
                        help="also real + synthetic and synthetic then real (3x the classifiers)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:SETTING",
                        help="a variant of every run and one of its config overrides "
                        "(section.field=value); repeat for more")
    options = parser.parse_args()
    missing = [run for run in options.runs if not (run / "audit" / "privacy.json").is_file()]
    if missing:
        sys.exit(f"{missing[0]}: no audit yet; run `unpersonal run` there first")
    variants: dict[str, list[str]] = {}
    for variant in options.variant:
        name, _, setting = variant.partition(":")
        if not name or "=" not in setting:
            sys.exit(f"--variant {variant!r}: give NAME:section.field=value")
        variants.setdefault(name, []).append(setting)
    made = [(name, make_variant(run, name, settings))
            for name, settings in variants.items() for run in options.runs]
    rows = [score(run, options.seeds, options.all_rows) for run in options.runs]
    for name, copy in made:
        rows.append({**score(copy, options.seeds, options.all_rows), "variant": name})
    for row in rows[1:]:
        row["differs_from_first"] = differences(rows[0]["config"], row["config"])
    for row in rows:
        del row["config"]
        print(f"{row['run']}: synthetic {row['auc']['synthetic']:.3f}, real "
              f"{row['auc']['real']:.3f}, gap {row['gap_pp']:+.1f} pp, audit "
              f"{'passes' if row['audit_passed'] else 'fails ' + ', '.join(row['audit_failed'])}")
    out = ROOT / "benchmarks" / "results" / f"validation-{options.name}.json"
    summary = summarise(rows, list(variants))
    for name, figures in summary.items():
        print(f"{name}: mean validation gap {figures['gap_pp_mean']:+.2f} pp against "
              f"{figures['base_gap_pp_mean']:+.2f}, paired difference "
              f"{figures['paired_difference_pp_mean']:+.2f} pp over {figures['runs']} runs")
    write_atomic(out, json.dumps({"date": datetime.now().strftime("%Y-%m-%d"),
                                  "split": "val", "classifier_seeds": options.seeds,
                                  "variants": {name: {"settings": settings, **summary[name]}
                                               for name, settings in variants.items()},
                                  "runs": rows}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
