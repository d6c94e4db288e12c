"""The privacy models on real chest X-rays: re-ID on held-out patients, planted copies, embedder.

    .venv/bin/python benchmarks/privacy_models.py        # Kermany at 64 px; see BENCHMARKS.md

Through the CLI, as a user would: prepare ../shared/data/kermany_cxr_64.npz at 64 px, then
fit-embedder, fit-reid and calibrate. Then:

* re-ID verification ROC-AUC on held-out patients (val + test, the pair set fit-reid documents);
* planted copies: 500 training images (seeded draw), each perturbed every way in
  `privacy.planted.PERTURBATIONS`, run through the combined filter (re-ID against all training
  patients and the source + both distance floors): share caught, per perturbation and per check;
* false rejects: the same filter on every test-split image (held-out patients, never used to
  calibrate anything): share rejected, per check;
* the embedder's linear-probe ROC-AUC on the test split.

Merges in benchmarks/results/knn.json (benchmarks/knn.py) and writes
benchmarks/results/privacy_models.json. Images and features stay in the run directory (runs/,
not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from runner import unpersonal
from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.privacy.filter import CHECKS
from unpersonal.privacy.planted import plant_copies
from unpersonal.rundir import RunDir
from unpersonal.stages.calibrate import load_filter

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
RESULTS = ROOT / "benchmarks" / "results"


def shares(result, mask: np.ndarray | None = None) -> dict[str, float]:
    """Share of rows flagged by each check and by the combined filter."""
    keep = slice(None) if mask is None else mask
    out = {check: round(float(result.flags[check][keep].mean()), 4) for check in CHECKS}
    out["combined"] = round(float(result.rejected[keep].mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-privacy-k64")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--planted", type=int, default=500)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override, e.g. reid.steps=500")
    options = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"needs {DATA}")
    sets = sum((["--set", o] for o in [f"data.resolution={options.resolution}",
                                         *options.overrides]), [])
    started = time.perf_counter()
    seconds = {"prepare": unpersonal("prepare", "--data", str(DATA), "--out", str(options.run),
                                     *sets)}
    for stage in ("fit-embedder", "fit-reid", "calibrate"):
        seconds[stage] = unpersonal(stage, "--out", str(options.run))

    run = RunDir(options.run)
    config = load_config(config_file=options.run / "config.yaml")
    reid = json.loads((run.stage_path("fit-reid") / "reid.json").read_text())
    embedder = json.loads((run.stage_path("fit-embedder") / "embedder.json").read_text())
    floors = json.loads((run.stage_path("calibrate") / "floors.json").read_text())
    dataset = load_canonical(run.stage_path("prepare"))
    train_rows = np.flatnonzero(dataset.split == "train")
    images = dataset.images_float()
    privacy_filter = load_filter(config, run)

    rng = np.random.default_rng(config.seed)
    chosen = rng.choice(len(train_rows), min(options.planted, len(train_rows)), replace=False)
    by_perturbation, caught_all, blind = {}, [], {}
    for name, copies in plant_copies(images[train_rows[chosen]], seed=config.seed).items():
        result = privacy_filter.check(copies, sources=chosen)
        by_perturbation[name] = shares(result)
        caught_all.append(result.rejected)
        # The same copies with their source unknown: what the all-patient check and the
        # floors catch on their own (the audit's situation, and a copy of another patient).
        blind[name] = shares(privacy_filter.check(copies))
        print(name, json.dumps(by_perturbation[name]), "without source:",
              json.dumps(blind[name]), flush=True)
    heldout = privacy_filter.check(images[dataset.split == "test"])
    false_reject = shares(heldout)
    print("held-out test images", json.dumps(false_reject), flush=True)

    knn_file = RESULTS / "knn.json"
    knn = json.loads(knn_file.read_text()) if knn_file.is_file() else {}
    result = {
        "reid_auc_heldout": reid["auc"]["val+test"],
        "reid_threshold": reid["threshold"],
        "reid": {key: reid[key] for key in reid if key not in ("architecture",)},
        "planted_copies_caught": round(float(np.concatenate(caught_all).mean()), 4),
        "planted_count": int(len(chosen)),
        "heldout_false_reject": false_reject["combined"],
        "heldout_false_reject_by_check": false_reject,
        "heldout_count": int((dataset.split == "test").sum()),
        "planted_by_perturbation": by_perturbation,
        "planted_by_perturbation_source_unknown": blind,
        "floors": floors["floors"],
        "embedder_linear_probe_auc": embedder["linear_probe"]["mean_auc"],
        "embedder": {key: embedder[key] for key in embedder if key != "architecture"},
        **{key: knn[key] for key in ("knn_seconds_exact", "knn_seconds_approx",
                                     "knn_recall_approx", "knn_seconds_cdist") if key in knn},
        "knn_details": "benchmarks/results/knn.json" if knn else None,
        "stage_seconds": seconds,
        "resolution": options.resolution,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, 2-core CPU, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/privacy_models.py" + "".join(
            f" --set {o}" for o in options.overrides),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "privacy_models.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("reid_auc_heldout", "planted_copies_caught",
                                             "heldout_false_reject")}))


if __name__ == "__main__":
    main()
