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
import subprocess
import sys
from pathlib import Path

import numpy as np

from diversity import report_trainings
from runner import sets, unpersonal

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


def report(trainings: int) -> None:
    """The table over the trainings whose results exist, into subtle.json and BENCHMARKS.md."""
    print(report_trainings("subtle", trainings, RESULTS / "subtle.json", "subtle.py"))


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
