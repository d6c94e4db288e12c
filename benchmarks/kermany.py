"""The headline benchmark: synthetic vs real on Kermany chest X-rays, with the privacy audit.

    .venv/bin/python benchmarks/kermany.py        # cpu preset, 32 px; see BENCHMARKS.md

Through the CLI, as a user would, in runs/bench-kermany-32 (stages already done there, e.g. by
benchmarks/generate.py, are reused): prepare, the privacy models, fit-diffusion with class +
pseudo conditioning, generate, audit, evaluate (classifiers over `--seeds` training seeds).
Then, in the same process, the other rows of the table, each audited and evaluated the same way:

* real training set: the training images themselves, as if released (utility's reference,
  privacy's worst case);
* unfiltered class-conditional diffusion: the run's own model told the labels alone (what
  `generate` draws its candidates from at the cpu preset), one image per training image with
  generate's solver and steps, through `unpersonal sample`: no filter, no label gate. The same
  network on both rows, so the difference between them is the filter's;
* unpersonal: the released set of `generate`;
* real + synthetic: both together, for utility;
* the reference recipe on the first `--reference-sources` sources (its full run would take days
  on 2 cores): cost and privacy only.

The whole pipeline is trained `--trainings` times (pipeline seeds 0, 1, ...; runs
bench-kermany-32, bench-kermany-32-t1, ...), each audited and evaluated; the headline figures
(`auc_*`, `gap_pp*`, the privacy figures, `nfe_per_accepted_ours`, `wall_time_s`) are means over
the trainings, each interval covering the test patients and the spread between trainings
(`trainings.py`), and every training's own figure is kept beside them. The rows below come from
the first training.

Each row's figures are kept in runs/bench-kermany-32-rows/ (written atomically, keyed by the
stages they come from), so a rerun after a crash or a kill picks up where it stopped; the
reference run resumes block by block like any `generate`.

The wall time is the sum of every stage's own time, read from the run directories (training
logs, generate.json, the manifest's seconds; the audit of the released set is timed again
here), plus the rows measured here: the figure of one uninterrupted run, even when it was built
over several. `invocation_s` is this command's own wall time: the whole benchmark's when it
starts from an empty run directory.

Writes benchmarks/results/kermany.json and its two tables into BENCHMARKS.md (between
the `<!-- kermany.py rows -->` and `<!-- kermany.py restoration -->` markers). Images stay in
the run directories (runs/, not committed).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runner import (DOWNSTREAM, copy_run_without, provenance, reference_run, sets, unpersonal,
                    write_table)
from trainings import markdown as trainings_markdown
from trainings import over_trainings
from unpersonal import stages
from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.audit import audit_set
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.privacy.attacks import membership_inference
from unpersonal.report.summary import equivalence_verdict
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages.audit import load_audit_models
from unpersonal.stages.evaluate import evaluate_run_set

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = ROOT / "BENCHMARKS.md"
COMMANDS = ("fit-embedder", "fit-reid", "calibrate", "fit-classifier", "fit-diffusion",
            "generate", "audit", "evaluate")
# Stages in the order one uninterrupted run builds them (the audit command builds three).
STAGE_ORDER = ("prepare", "fit-embedder", "fit-reid", "calibrate", "fit-classifier",
               "fit-diffusion", "generate", "audit-embedder", "audit-reid", "audit", "eval")


def pipeline(run: Path, seeds: int, seed: int = 0) -> None:
    """Our pipeline through the CLI (pipeline seed `seed`); each command skips what is already
    done. Trainings after the first skip the restoration rows, which the first reports."""
    unpersonal("prepare", "--data", str(DATA), "--out", str(run), "--preset", "cpu",
               *sets("diffusion.conditioning=class+pseudo", f"seed={seed}",
                     *(["evaluate.restoration=false"] if seed else [])))
    for command in COMMANDS:
        extra = sets(f"evaluate.classifier_seeds={seeds}") if command == "evaluate" else []
        unpersonal(command, "--out", str(run), *extra)


def training_runs(first: Path, trainings: int) -> list[Path]:
    """The run folder of each training: the first, then FIRST-t1, FIRST-t2, ..."""
    return [first, *(first.with_name(f"{first.name}-t{t}") for t in range(1, trainings))]


def stage_seconds(run: Path, order: tuple[str, ...] = STAGE_ORDER) -> dict[str, float]:
    """Each stage's own wall time, read from what the stage left in the run directory.

    Trainers record their seconds in their summary file (`seconds`, resumes included) or log
    `elapsed_s`; generate records `seconds_total`; the others, the seconds the manifest keeps
    (for a resumed stage, its last part only; older runs: the time from the previous stage's
    finish to this one's).
    """
    manifest = RunDir(run).manifest()["stages"]
    finished = {stage: datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%S%z")
                for stage, record in manifest.items()}
    seconds: dict[str, float] = {}
    for previous, stage in zip(order, order[1:]):
        if stage == "generate":
            seconds[stage] = json.loads((run / stage / "generate.json").read_text())[
                "seconds_total"]
        elif (recorded := summary_seconds(run, stage)) is not None:
            seconds[stage] = recorded
        elif (trained := training_seconds(run / stage)) is not None:
            seconds[stage] = trained
        elif manifest[stage].get("seconds") is not None:
            seconds[stage] = manifest[stage]["seconds"]
        else:  # runs made before the manifest kept each stage's seconds
            seconds[stage] = (finished[stage] - finished[previous]).total_seconds()
    return {stage: round(value, 1) for stage, value in seconds.items()}


def cached(folder: Path, name: str, key: str, compute: Callable[[], dict[str, Any]]
           ) -> dict[str, Any]:
    """A row's figures, computed once per `key` and kept, with the seconds they took."""
    path = folder / f"{name}.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept["key"] == key:
            return kept
    started = time.perf_counter()
    value = compute()
    text = json.dumps({"key": key, "seconds": round(time.perf_counter() - started, 1),
                       "value": value}, indent=2)
    write_atomic(path, text + "\n")
    return json.loads(text)  # as a rerun reads it


def stages_key(run: Path, *stages: str) -> str:
    """A key that changes when any of `stages` is rebuilt."""
    manifest = RunDir(run).manifest()["stages"]
    keys = [manifest[stage]["key"] + manifest[stage]["finished"] for stage in stages]
    return hashlib.sha256("".join(keys).encode()).hexdigest()[:16]


def unfiltered_sample(run: Path, count: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One image per training image from the run's own model told the labels alone (guidance
    0 against the labels), with the run's solver and steps, no filter; with the seconds the
    sampling took (the model is the run's, trained once for both rows).

    Drawn in a copy of the run: `sample` keeps its settings in the config, and the guidance
    set here is part of generate's key too; the run must stay as generate left it."""
    copy = copy_run_without(run, run.with_name(run.name + "-unfiltered"), (*DOWNSTREAM, "sample"))
    sampling = unpersonal("sample", "--out", str(copy), *sets(
        f"sampling.count={count}", "sampling.guidance=0", "sampling.guidance_against=labels",
        "sampling.batch_size=250"))
    with np.load(copy / "sample" / "images.npz") as arrays:
        drawn = (arrays["images"].astype(np.float32) / 255.0, arrays["labels"],
                 {"sample": sampling})
    shutil.rmtree(copy)
    return drawn


def summary_seconds(run: Path, stage: str) -> float | None:
    """The `seconds` a stage's summary file records (the trainers' own time), if any."""
    name = stages.stage(stage).summary_file
    path = run / stage / name if name else None
    if path is None or not path.is_file():
        return None
    recorded = json.loads(path.read_text()).get("seconds")
    return None if recorded is None else float(recorded)


def training_seconds(stage: Path) -> float | None:
    """A training stage's own time, from the last `elapsed_s` of its log (None without one)."""
    log = stage / "training_log.csv"
    if not log.is_file():
        return None
    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "elapsed_s" not in rows[-1]:
        return None
    return round(float(rows[-1]["elapsed_s"]), 1)


def utility_row(figures: dict[str, Any], key: str) -> dict[str, Any]:
    out = {"auc": figures[key]["mean"], "auc_ci": figures[key]["ci95"],
           "auc_per_seed": figures[key]["per_seed"],
           "auc_std_over_seeds": figures[key]["std_over_seeds"]}
    if key == "real":
        return out | {"gap_pp": 0.0}
    suffix = "" if key == "synthetic" else f"_{key}"
    return out | {"gap_pp": figures[f"gap_pp{suffix}"],
                  "gap_pp_ci": figures[f"gap_pp{suffix}_ci95"]}


def privacy_row(privacy: dict[str, Any]) -> dict[str, Any]:
    mia = privacy["membership_inference"]
    return {"reid_rate": privacy["reid_rate"]["synthetic"],
            "reid_rate_heldout": privacy["reid_rate"]["heldout"],
            "mia_auc": max(mia["distance"]["auc"], mia["density_ratio"]["auc"]),
            "pso_excess": privacy["singling_out"]["max_excess"],
            "pso_excess_ci": privacy["singling_out"]["max_ci"],
            "pso_significant": privacy["singling_out"]["significant"]}


def fidelity_row(fidelity: dict[str, Any]) -> dict[str, Any]:
    return {"fd": fidelity["fd"], "recall": fidelity["prdc"]["recall"],
            "coverage": fidelity["prdc"]["coverage"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ("| training data for the classifier | test ROC-AUC (95% CI) | gap to real (pp) | "
              "re-ID rate | MIA AUC | PSO excess (95% CI) | FD | recall | coverage | "
              "wall time (to make the set) |")
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


def restoration_markdown(restoration: dict[str, Any]) -> str:
    lines = ["| task | trained on | PSNR dB (95% CI) | SSIM (95% CI) |", "|---|---|---|---|"]
    for task, figures in restoration.items():
        for name in ("baseline", "real", "synthetic"):
            psnr, ssim = figures[name]["psnr"], figures[name]["ssim"]
            lines.append(f"| {task} | {name} | {psnr['mean']:.2f} ({psnr['ci95'][0]:.2f}-"
                         f"{psnr['ci95'][1]:.2f}) | {ssim['mean']:.4f} ({ssim['ci95'][0]:.4f}-"
                         f"{ssim['ci95'][1]:.4f}) |")
        diff = figures["difference"]["psnr"]
        lines.append(f"| {task} | synthetic - real | {diff['mean']:+.2f} ({diff['ci95'][0]:+.2f}"
                     f" to {diff['ci95'][1]:+.2f}) | equivalent: {equivalence_verdict(figures)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--seeds", type=int, default=5, help="classifier training seeds")
    parser.add_argument("--trainings", type=int, default=3,
                        help="trainings of the whole pipeline (seeds 0, 1, ...): the headline "
                        "figures are their means; the other rows come from the first")
    parser.add_argument("--reference-sources", type=int, default=40,
                        help="sources of the reference recipe: about 20 s each on 2 cores, so "
                        "40 keep the whole benchmark within 90 minutes")
    options = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"needs {DATA}")
    invoked = time.perf_counter()
    runs = training_runs(options.run, options.trainings)
    for seed, folder in enumerate(runs):
        pipeline(folder, options.seeds, seed)
    rows_folder = options.run.with_name(options.run.name + "-rows")
    run = RunDir(options.run)
    config = load_config(config_file=options.run / "config.yaml")
    config.evaluate.classifier_seeds = options.seeds
    dataset = load_canonical(run.stage_path("prepare"))
    train = dataset.subset("train")
    metrics = json.loads((options.run / "eval" / "metrics.json").read_text())
    privacy = json.loads((options.run / "audit" / "privacy.json").read_text())
    generation = json.loads((options.run / "generate" / "generate.json").read_text())
    models = load_audit_models(config, run, dataset)

    def audit(images: np.ndarray) -> dict[str, Any]:
        return audit_set(models, images, config.audit, config.seed)[0]

    # The audit's models, and the privacy settings (calibrate's key) its pixel check follows.
    audited = stages_key(options.run, "audit-embedder", "audit-reid", "calibrate")

    real_privacy = cached(rows_folder, "real-privacy", audited, lambda: audit(
        train.images_float()))
    # The released set audited again in this process: the audit stage's own time (its manifest
    # entry may be a rerun's), and a check that the audit repeats to the last digit.
    released = read_synthetic_set(options.run / "generate" / "synthetic", dataset.label_names)
    ours_privacy = cached(rows_folder, "ours-privacy", stages_key(options.run, "audit"),
                          lambda: audit(released.images))
    if ours_privacy["value"] != privacy:
        sys.exit("the audit of the released set did not repeat: compare "
                 f"{rows_folder / 'ours-privacy.json'} with audit/privacy.json")

    sample_once = functools.cache(  # seeded: the same images every time
        lambda: unfiltered_sample(options.run, len(train)))

    def unfiltered() -> dict[str, Any]:
        images, labels, made_in = sample_once()
        quick = config.model_copy(deep=True)
        quick.evaluate.restoration = False
        quick.evaluate.real_plus_synthetic = False
        # The real-trained classifiers are evaluate's (same seeds, same settings).
        with np.load(options.run / "eval" / "test_probs.npz") as saved:
            real_probs = saved["real"]
        evaluation, _ = evaluate_run_set(quick, run, dataset, images, labels, real_probs)
        return {"metrics": evaluation, "seconds": made_in}

    # Its real-trained classifiers are evaluate's, which depend on fit-classifier and the seeds.
    drawn = stages_key(options.run, "fit-diffusion")
    unfiltered_row = cached(rows_folder, "unfiltered", stages_key(
        options.run, "fit-classifier", "audit-embedder", "audit-reid") + drawn
        + f"-{options.seeds}", unfiltered)
    unfiltered_privacy = cached(rows_folder, "unfiltered-privacy", audited + drawn,
                                lambda: audit(sample_once()[0]))
    made_in = unfiltered_row["value"]["seconds"]

    def reference() -> dict[str, Any]:
        folder = reference_run(options.run, options.reference_sources)
        released = read_synthetic_set(folder / "generate" / "synthetic", dataset.label_names)
        return {"generate": json.loads((folder / "generate" / "generate.json").read_text()),
                "privacy": audit(released.images)}

    reference_row = cached(rows_folder, f"reference-{options.reference_sources}",
                           stages_key(options.run, "calibrate", "fit-diffusion") + audited,
                           reference)
    ref_generation = reference_row["value"]["generate"]
    ref_privacy = reference_row["value"]["privacy"]

    # The same attacks with the test split as non-members (the audit uses validation): Kermany's
    # official test split was collected apart, and the density attack measures that instead.
    test = dataset.subset("test")
    shifted = membership_inference(models.features["train"],
                                   models.embedder.embed(test.images_float()),
                                   models.embedder.embed(released.images),
                                   heldout_patient=test.patient_id, seed=config.seed)
    classification = metrics["utility"]["classification"]
    seconds = stage_seconds(options.run) | {"audit": ours_privacy["seconds"]}
    seconds |= {"real_row_audit": real_privacy["seconds"],
                "unfiltered_row": unfiltered_row["seconds"],  # its sampling included
                "unfiltered_row_audit": unfiltered_privacy["seconds"],
                "reference_row": reference_row["seconds"]}
    unfiltered_metrics = unfiltered_row["value"]["metrics"]
    rows = [
        {"training_data": "real training set", **utility_row(classification, "real"),
         **privacy_row(real_privacy["value"]), "wall_time_s": None},
        {"training_data": "unfiltered class-conditional diffusion",
         **utility_row(unfiltered_metrics["utility"]["classification"], "synthetic"),
         **privacy_row(unfiltered_privacy["value"]),
         **fidelity_row(unfiltered_metrics["fidelity"]),
         # The shared model's training and this row's sampling.
         "wall_time_s": seconds["fit-diffusion"] + made_in["sample"], "made_in_s": made_in},
        {"training_data": "unpersonal (filtered, diversity-aware)",
         **utility_row(classification, "synthetic"), **privacy_row(privacy),
         **fidelity_row(metrics["fidelity"]),
         "wall_time_s": seconds["fit-diffusion"] + seconds["generate"]},
        {"training_data": "real + unpersonal", **utility_row(classification, "real+synthetic"),
         "wall_time_s": None},
        {"training_data": "unpersonal, then fine-tuned on real",
         **utility_row(classification, "synthetic-then-real"), "wall_time_s": None},
        {"training_data": f"reference recipe ({ref_generation['sources']} sources)",
         **privacy_row(ref_privacy), "wall_time_s": ref_generation["seconds_total"]},
    ]
    restoration = metrics["utility"].get("restoration", {})
    summary = over_trainings(runs, config.evaluate.bootstrap, config.seed)
    per_training = [stage_seconds(folder) for folder in runs]
    sets_over = summary["training_sets"]

    def restored(task: str, name: str) -> float | None:
        return restoration.get(task, {}).get(name, {}).get("psnr", {}).get("mean")

    # The headline keys are means over the trainings (`trainings.py`); "first_training" and
    # the rows are the first training's, with the rows the others do not repeat.
    results = {
        "trainings": summary["trainings"],
        "auc_real": sets_over["real"]["auc"],
        "auc_synthetic": sets_over["synthetic"]["auc"],
        "auc_synthetic_ci": sets_over["synthetic"]["auc_ci95"],
        "auc_synthetic_per_training": sets_over["synthetic"]["auc_per_training"],
        "auc_real_plus_synthetic": sets_over.get("real+synthetic", {}).get("auc"),
        "gap_pp": sets_over["synthetic"]["gap_pp"],
        "gap_pp_ci": sets_over["synthetic"]["gap_pp_ci95"],
        "gap_pp_per_training": sets_over["synthetic"]["gap_pp_per_training"],
        "gap_pp_real_plus_synthetic": sets_over.get("real+synthetic", {}).get("gap_pp"),
        "gap_pp_real_plus_synthetic_ci": sets_over.get("real+synthetic", {}).get("gap_pp_ci95"),
        "auc_pretrain_finetune": sets_over.get("synthetic-then-real", {}).get("auc"),
        "gap_pp_pretrain_finetune": sets_over.get("synthetic-then-real", {}).get("gap_pp"),
        "gap_pp_pretrain_finetune_ci": sets_over.get("synthetic-then-real", {}).get(
            "gap_pp_ci95"),
        "over_trainings": summary,
        "classifier_seeds": classification["seeds"],
        "reid_rate_synthetic": summary["privacy"]["reid_rate_synthetic"]["mean"],
        "reid_rate_heldout": summary["privacy"]["reid_rate_heldout"]["mean"],
        "mia_auc": summary["privacy"]["mia_auc"]["mean"],
        "audits_passed": summary["audits_passed"],
        "first_training": {"auc_synthetic": classification["synthetic"]["mean"],
                           "gap_pp": classification["gap_pp"],
                           "mia_auc": privacy_row(privacy)["mia_auc"]},
        "mia_nonmember_split": privacy["membership_inference"]["nonmember_split"],
        "mia_auc_test_split_nonmembers": {attack: shifted[attack]["auc"]
                                          for attack in ("distance", "density_ratio")},
        "pso_excess": summary["privacy"]["pso_excess"]["mean"],
        # The union of the trainings' intervals: every training's excess lies in its own.
        "pso_excess_ci": [min(ci[0] for ci in summary["privacy"]["pso_excess_ci_per_training"]),
                          max(ci[1] for ci in summary["privacy"]["pso_excess_ci_per_training"])],
        "fd": metrics["fidelity"]["fd"], "fd_real_test": metrics["fidelity"]["fd_real_test"],
        "recall": metrics["fidelity"]["prdc"]["recall"],
        "coverage": metrics["fidelity"]["prdc"]["coverage"],
        "nfe_per_accepted_ours": float(np.mean([
            json.loads((folder / "generate" / "generate.json").read_text())["nfe_per_accepted"]
            for folder in runs])),
        "nfe_per_accepted_reference": ref_generation["nfe_per_accepted"],
        "seconds_per_accepted_ours": generation["seconds_per_accepted"],
        "seconds_per_accepted_reference": ref_generation["seconds_per_accepted"],
        "acceptance_rate_ours": generation["acceptance_rate"],
        "acceptance_rate_reference": ref_generation["acceptance_rate"],
        "audit_flagged_ours": privacy["reid_rate"]["synthetic"],
        "audit_flagged_reference": ref_privacy["reid_rate"]["synthetic"],
        "reference_accepted_that_our_filter_rejects": ref_generation[
            "accepted_strictly_rejected"],
        "reference_accepted": ref_generation["images"],
        "psnr_denoise_real": restored("denoise", "real"),
        "psnr_denoise_synthetic": restored("denoise", "synthetic"),
        "psnr_sr_real": restored("sr", "real"),
        "psnr_sr_synthetic": restored("sr", "synthetic"),
        "restoration": restoration,
        "rows": rows,
        "stage_seconds": seconds,
        # One training's wall time, the mean over trainings (each from its own stages), and
        # the first's with the rows only it makes.
        "wall_time_s": round(float(np.mean([sum(t.values()) for t in per_training])), 1),
        "wall_time_s_per_training": [round(sum(t.values()), 1) for t in per_training],
        "wall_time_s_first_with_rows": round(sum(seconds.values()), 1),
        "invocation_s": round(time.perf_counter() - invoked, 1),
        **provenance(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "kermany.json", json.dumps(results, indent=2) + "\n")
    tables = {"kermany.py rows": markdown(rows),
              "kermany.py trainings": trainings_markdown(summary),
              "kermany.py restoration": restoration_markdown(restoration)}
    print(*tables.values(),
          json.dumps({"stage_seconds": seconds, "wall_time_s": results["wall_time_s"],
                      "invocation_s": results["invocation_s"]}, indent=2),
          sep="\n\n")
    for name, table in tables.items():
        if not write_table(BENCHMARKS, name, table):
            print(f"{BENCHMARKS.name} has no '<!-- {name} -->' block: its table was not "
                  "updated", file=sys.stderr)


if __name__ == "__main__":
    main()
