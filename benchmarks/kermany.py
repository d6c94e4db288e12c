"""The headline benchmark: synthetic vs real on Kermany chest X-rays, with the privacy audit.

    .venv/bin/python benchmarks/kermany.py        # cpu preset, 32 px; see BENCHMARKS.md

Through the CLI, as a user would, in runs/bench-kermany-32 (stages already done there, e.g. by
benchmarks/generate.py, are reused): prepare, the privacy models, fit-diffusion with class +
pseudo conditioning, generate, audit, evaluate (classifiers over `--seeds` training seeds).
Then, in the same process, the other rows of the table, each audited and evaluated the same way:

* real training set: the training images themselves, as if released (utility's reference,
  privacy's worst case);
* unfiltered class-conditional diffusion: the class-conditional model of
  benchmarks/diffusion_quality.py (runs/bench-diffusion-k32, trained with the same preset on the
  same split; trained here if absent), one image per training image, no filter;
* unpersonal: the released set of `generate`;
* real + synthetic: both together, for utility;
* the reference recipe on the first `--reference-sources` sources (its full run would take days
  on 2 cores): cost and privacy only.

Writes benchmarks/results/kermany.json and prints the table for BENCHMARKS.md. Images stay in
the run directories (runs/, not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runner import copy_run_without, cores, sets, unpersonal
from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.audit import AuditModels, audit_set
from unpersonal.evaluation.evaluate import evaluate_set
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("fit-embedder", "fit-reid", "calibrate", "fit-classifier", "fit-diffusion", "generate")
REFERENCE = ("generate.mode=best", "generate.candidates=32", "generate.attempts=1",
             "sampling.solver=heun", "sampling.steps=32", "sampling.guide=cfg",
             "sampling.guidance_against=empty", "generate.guidance=2.0",
             "generate.reid_check=source",
             "generate.reid_threshold=0.5", "generate.distance_floors=false")


def pipeline(run: Path, seeds: int) -> dict[str, float]:
    """Our pipeline through the CLI; returns each command's wall time in this invocation."""
    seconds = {"prepare": unpersonal("prepare", "--data", str(DATA), "--out", str(run),
                                     "--preset", "cpu",
                                     *sets("diffusion.conditioning=class+pseudo"))}
    for stage in STAGES:
        seconds[stage] = unpersonal(stage, "--out", str(run))
    seconds["audit"] = unpersonal("audit", "--out", str(run))
    seconds["evaluate"] = unpersonal("evaluate", "--out", str(run),
                                     *sets(f"evaluate.classifier_seeds={seeds}"))
    return seconds


def unfiltered_sample(run: Path, count: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One class-conditional image per training image, no filter (DPM-Solver++ 16 steps)."""
    model_run = ROOT / "runs" / "bench-diffusion-k32"
    wall = 0.0
    if not (model_run / "fit-diffusion" / "model.json").is_file():
        wall += unpersonal("prepare", "--data", str(DATA), "--out", str(model_run), "--preset",
                           "cpu", *sets("diffusion.conditioning=class"))
        wall += unpersonal("fit-diffusion", "--out", str(model_run))
    wall += unpersonal("sample", "--out", str(model_run), "--force",
                       *sets("diffusion.conditioning=class", f"sampling.count={count}",
                             "sampling.solver=dpmpp2m", "sampling.steps=16",
                             "sampling.batch_size=250"))
    with np.load(model_run / "sample" / "images.npz") as arrays:
        images, labels = arrays["images"], arrays["labels"]
    return images.astype(np.float32) / 255.0, labels, wall


def reference_run(run: Path, sources: int) -> tuple[dict[str, Any], Path, float]:
    copy = copy_run_without(run, run.with_name(run.name + "-reference"))
    wall = unpersonal("generate", "--out", str(copy), *sets(*REFERENCE,
                                                           f"generate.count={sources}"))
    return json.loads((copy / "generate" / "generate.json").read_text()), copy, wall


def row(name: str, utility: dict[str, Any] | None, privacy: dict[str, Any] | None,
        fidelity: dict[str, Any] | None, wall: float | None, key: str = "synthetic"
        ) -> dict[str, Any]:
    out: dict[str, Any] = {"training_data": name, "wall_time_s": wall}
    if utility is not None:
        figures = utility[key]
        out.update(auc=figures["mean"], auc_ci=figures["ci95"],
                   auc_std_over_seeds=figures["std_over_seeds"])
        if key != "real":
            suffix = "" if key == "synthetic" else f"_{key}"
            out["gap_pp"] = utility[f"gap_pp{suffix}"]
            out["gap_pp_ci"] = utility[f"gap_pp{suffix}_ci95"]
        else:
            out["gap_pp"] = 0.0
    if privacy is not None:
        mia = privacy["membership_inference"]
        out.update(reid_rate=privacy["reid_rate"]["synthetic"],
                   reid_rate_heldout=privacy["reid_rate"]["heldout"],
                   mia_auc=max(mia["distance"]["auc"], mia["density_ratio"]["auc"]),
                   pso_excess=privacy["singling_out"]["max_excess"],
                   pso_excess_ci=privacy["singling_out"]["max_ci"],
                   pso_significant=privacy["singling_out"]["significant"])
    if fidelity is not None:
        out.update(fd=fidelity["fd"], recall=fidelity["prdc"]["recall"],
                   coverage=fidelity["prdc"]["coverage"])
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ("| training data for the classifier | test ROC-AUC (95% CI) | gap to real (pp) | "
              "re-ID rate | MIA AUC | PSO excess (95% CI) | FD | recall | coverage | wall time |")
    lines = [header, "|" + "---|" * 10]

    def cell(value: Any, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for r in rows:
        auc = (f"{r['auc']:.3f} ({r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f})"
               if r.get("auc") is not None else "")
        pso = (f"{r['pso_excess']:+.3f} ({r['pso_excess_ci'][0]:+.3f} to "
               f"{r['pso_excess_ci'][1]:+.3f})" if r.get("pso_excess") is not None else "")
        wall = f"{r['wall_time_s'] / 60:.1f} min" if r.get("wall_time_s") else ""
        lines.append(f"| {r['training_data']} | {auc} | {cell(r.get('gap_pp'), '+.2f')} | "
                     f"{cell(r.get('reid_rate'), '.3f')} | {cell(r.get('mia_auc'), '.3f')} | "
                     f"{pso} | {cell(r.get('fd'), '.4f')} | {cell(r.get('recall'), '.3f')} | "
                     f"{cell(r.get('coverage'), '.3f')} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--seeds", type=int, default=5, help="classifier training seeds")
    parser.add_argument("--reference-sources", type=int, default=50)
    options = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"needs {DATA}")
    started = time.perf_counter()
    seconds = pipeline(options.run, options.seeds)
    run = RunDir(options.run)
    config = load_config(config_file=options.run / "config.yaml")
    config.evaluate.classifier_seeds = options.seeds
    dataset = load_canonical(run.stage_path("prepare"))
    train = dataset.subset("train")
    metrics = json.loads((options.run / "eval" / "metrics.json").read_text())
    privacy = json.loads((options.run / "audit" / "privacy.json").read_text())
    generation = json.loads((options.run / "generate" / "generate.json").read_text())
    models = AuditModels(run, dataset, config.privacy.reid_heldout_quantile,
                         config.audit.reid_neighbours)

    quick = config.model_copy(deep=True)
    quick.evaluate.restoration = False
    quick.evaluate.real_plus_synthetic = False
    real_privacy, _ = audit_set(config, run, dataset, train.images_float(), models)
    unfiltered_images, unfiltered_labels, seconds["unfiltered_sample"] = unfiltered_sample(
        options.run, len(train))
    # Its "real" classifiers are the real row's (same seeds and settings as evaluate's).
    unfiltered_metrics, _ = evaluate_set(quick, run, dataset, unfiltered_images,
                                         unfiltered_labels)
    unfiltered_privacy, _ = audit_set(config, run, dataset, unfiltered_images, models)

    reference, reference_folder, seconds["reference_generate"] = reference_run(
        options.run, options.reference_sources)
    reference_set = read_synthetic_set(reference_folder / "generate" / "synthetic",
                                       dataset.label_names)
    reference_privacy, _ = audit_set(config, run, dataset, reference_set.images, models)

    classification = metrics["utility"]["classification"]
    ours_wall = sum(seconds[stage] for stage in ("fit-diffusion", "generate"))
    rows = [
        row("real training set", unfiltered_metrics["utility"]["classification"], real_privacy,
            None, None, key="real"),
        row("unfiltered class-conditional diffusion", unfiltered_metrics["utility"]
            ["classification"], unfiltered_privacy, unfiltered_metrics["fidelity"],
            seconds["unfiltered_sample"]),
        row("unpersonal (filtered, diversity-aware)", classification, privacy,
            metrics["fidelity"], ours_wall),
        row("real + unpersonal", classification, None, None, None, key="real+synthetic"),
        row(f"reference recipe ({reference['sources']} sources)", None, reference_privacy,
            None, seconds["reference_generate"]),
    ]
    restoration = metrics["utility"].get("restoration", {})
    results = {
        "auc_real": classification["real"]["mean"],
        "auc_synthetic": classification["synthetic"]["mean"],
        "auc_synthetic_ci": classification["synthetic"]["ci95"],
        "auc_real_plus_synthetic": classification.get("real+synthetic", {}).get("mean"),
        "gap_pp": classification["gap_pp"],
        "gap_pp_ci": classification["gap_pp_ci95"],
        "classifier_seeds": options.seeds,
        "reid_rate_synthetic": privacy["reid_rate"]["synthetic"],
        "reid_rate_heldout": privacy["reid_rate"]["heldout"],
        "mia_auc": max(privacy["membership_inference"]["distance"]["auc"],
                       privacy["membership_inference"]["density_ratio"]["auc"]),
        "pso_excess": privacy["singling_out"]["max_excess"],
        "pso_excess_ci": privacy["singling_out"]["max_ci"],
        "fd": metrics["fidelity"]["fd"], "recall": metrics["fidelity"]["prdc"]["recall"],
        "coverage": metrics["fidelity"]["prdc"]["coverage"],
        "nfe_per_accepted_ours": generation["nfe_per_accepted"],
        "nfe_per_accepted_reference": reference["nfe_per_accepted"],
        "seconds_per_accepted_ours": generation["seconds_per_accepted"],
        "seconds_per_accepted_reference": reference["seconds_per_accepted"],
        "audit_flagged_ours": privacy["reid_rate"]["synthetic"],
        "audit_flagged_reference": reference_privacy["reid_rate"]["synthetic"],
        "reference_accepted_that_our_filter_rejects": reference["accepted_strictly_rejected"],
        "psnr_denoise_real": restoration.get("denoise", {}).get("real", {}).get("psnr", {}).get("mean"),
        "psnr_denoise_synthetic": restoration.get("denoise", {}).get("synthetic", {}).get(
            "psnr", {}).get("mean"),
        "psnr_sr_real": restoration.get("sr", {}).get("real", {}).get("psnr", {}).get("mean"),
        "psnr_sr_synthetic": restoration.get("sr", {}).get("synthetic", {}).get("psnr", {}).get(
            "mean"),
        "restoration": restoration,
        "rows": rows,
        "stage_seconds": seconds,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {cores()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/kermany.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kermany.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
