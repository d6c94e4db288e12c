"""The small, subtle task: Kermany's three subtypes from about 700 training images, trained
several times, each release scored labels-only against diversity-aware.

    .venv/bin/python benchmarks/subtle.py [--trainings 3] [--images 700] [--only T ...]

1. Writes `runs/subtle-data/kermany_subtypes_64.npz` from the shared Kermany file: the training
   split cut to whole patients drawn at random (seeded) until at least `--images` images, the
   validation and test splits whole; the label is the subtype (0 normal, 1 bacterial, 2 viral
   pneumonia), multi-class. It is derived from the shared data and lives under `runs/`, never
   committed.
2. For each training t (seed t): `unpersonal run` with the cpu preset into
   `runs/bench-subtle-t` (resumable), evaluated with `--seeds` classifier seeds and no
   restoration, the labels-only release of the preset.
3. `benchmarks/diversity.py` on each run, for every source, its results kept per training
   (`benchmarks/results/subtle-t.json`).

4. The table over trainings (`--report` alone makes it from the results files): per release,
   the mean over trainings of each figure, every training's gap to real, and how many
   trainings' releases passed the audit, into BENCHMARKS.md (`<!-- subtle.py -->`) and
   `benchmarks/results/subtle.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runner import provenance, sets, unpersonal, write_table
from unpersonal.rundir import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
SUBTYPES = ("normal", "bacteria", "virus")
RESULTS = ROOT / "benchmarks" / "results"


def subset_file(images: int, seed: int, out: Path) -> Path:
    """The three-subtype file with a training split of whole patients (at least `images`)."""
    if out.is_file():
        return out
    with np.load(SOURCE) as data:
        arrays = {key: data[key] for key in ("images", "patient_id", "split", "subtype")}
    unknown = set(np.unique(arrays["subtype"])) - set(SUBTYPES)
    if unknown:
        sys.exit(f"{SOURCE}: unknown subtypes {sorted(unknown)}")
    train = arrays["split"] == "train"
    patients = np.random.default_rng([seed, 23]).permutation(
        np.unique(arrays["patient_id"][train]))
    counts = {p: c for p, c in zip(*np.unique(arrays["patient_id"][train], return_counts=True))}
    chosen, total = set(), 0
    for patient in patients:
        if total >= images:
            break
        chosen.add(patient)
        total += counts[patient]
    keep = ~train | np.isin(arrays["patient_id"], list(chosen))
    label = np.array([SUBTYPES.index(s) for s in arrays["subtype"][keep]], np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.npz")
    np.savez(partial, images=arrays["images"][keep], label=label,
             patient_id=arrays["patient_id"][keep], split=arrays["split"][keep])
    partial.replace(out)
    print(f"{out}: {total} training images of {len(chosen)} patients, "
          f"{int((~train).sum())} validation and test images", flush=True)
    return out


def over_trainings(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per release present in every training: the mean of each figure, and each training's."""
    names = [name for name in results[0]["releases"]
             if all(name in r["releases"] for r in results)]
    out = {}
    for name in names:
        rows = [r["releases"][name] for r in results]
        out[name] = {"trainings": len(rows),
                     **{key: _mean([row.get(key) for row in rows])
                        for key in ("images", "auc", "auc_real", "gap_pp", "coverage", "recall",
                                    "fd", "retrieval", "nfe_per_accepted")},
                     "gap_pp_per_training": [round(row["gap_pp"], 2) for row in rows],
                     "auc_per_training": [round(row["auc"], 4) for row in rows],
                     "audit_passed": sum(bool(row["audit_passed"]) for row in rows)}
    return out


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None where a release lacks the figure (a subset of another's images)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def markdown(table: dict[str, dict[str, Any]]) -> str:
    lines = ["| release | trainings | images | ROC-AUC (real) | gap to real (pp): mean, per training "
             "| coverage | recall | FD | retrieval | NFE / image | audit passed |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    def cell(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for name, r in table.items():
        each = ", ".join(f"{gap:+.1f}" for gap in r["gap_pp_per_training"])
        lines.append(f"| {name} | {r['trainings']} | {r['images']:.0f} | {r['auc']:.3f} "
                     f"({r['auc_real']:.3f}) | {r['gap_pp']:+.1f}: {each} | "
                     f"{cell(r['coverage'], '.3f')} | {cell(r['recall'], '.3f')} | "
                     f"{cell(r['fd'], '.4f')} | {cell(r['retrieval'], '.3f')} | "
                     f"{cell(r['nfe_per_accepted'], '.1f')} | "
                     f"{r['audit_passed']} of {r['trainings']} |")
    return "\n".join(lines)


def report(trainings: int) -> None:
    files = [RESULTS / f"subtle-{t}.json" for t in range(trainings)]
    results = [json.loads(f.read_text()) for f in files if f.is_file()]
    if not results:
        sys.exit("no results yet: run the trainings first")
    table = over_trainings(results)
    write_atomic(RESULTS / "subtle.json", json.dumps(
        {**provenance(), "trainings": [r["run"] for r in results], "releases": table},
        indent=2) + "\n")
    write_table(ROOT / "BENCHMARKS.md", "subtle.py", markdown(table))
    print(markdown(table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainings", type=int, default=3)
    parser.add_argument("--images", type=int, default=700)
    parser.add_argument("--seeds", type=int, default=3, help="classifier training seeds")
    parser.add_argument("--only", type=int, nargs="+", metavar="T",
                        help="run only these trainings (for example one per core, in parallel)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the data file and prepare the runs, train nothing")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: the table over the trainings whose results exist")
    options = parser.parse_args()
    if options.report:
        report(options.trainings)
        return
    if not SOURCE.is_file():
        sys.exit(f"needs {SOURCE}")
    data = subset_file(options.images, 0, ROOT / "runs" / "subtle-data"
                       / "kermany_subtypes_64.npz")
    for training in options.only or range(options.trainings):
        run = ROOT / "runs" / f"bench-subtle-{training}"
        common = ("--out", str(run), "--data", str(data), "--preset", "cpu",
                  *sets(f"seed={training}", "evaluate.restoration=false",
                        f"evaluate.classifier_seeds={options.seeds}"))
        if options.prepare_only:
            unpersonal("prepare", *common)
            continue
        unpersonal("run", *common)
        subprocess.run([sys.executable, str(Path(__file__).with_name("diversity.py")),
                        "--run", str(run), "--seeds", str(options.seeds), "--sources", "0",
                        "--name", f"subtle-{training}"], check=True)
    if not options.prepare_only:
        report(options.trainings)


if __name__ == "__main__":
    main()
