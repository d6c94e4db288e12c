"""Diversity-aware releases against the labels-only release, with the same trained models.

    .venv/bin/python benchmarks/diversity.py --run runs/bench-kermany-32 [--sources 2240]

On the evaluated run of benchmarks/kermany.py (its release drawn from the labels alone, the cpu
preset), for each diversity-aware condition below: a copy of the run in which only `generate`
and the audit run again, for the first `--sources` sources of the run's order, with that
condition. Each release is scored beside the labels-only release's images from the same sources
(same models, same real-trained classifiers):

* utility: test ROC-AUC of classifiers trained on it (the run's `evaluate.classifier_seeds`
  seeds, `--seeds` to change), and its gap to real;
* fidelity and diversity in the audit embedder's space: FD, precision, recall, coverage, and
  the retrieval score, the share of training images that are some synthetic image's nearest
  training image, for as many synthetic images as the test split holds (a set that covers
  every mode retrieves many; the real test images' score is its yardstick);
* cost: candidates and NFE per accepted image; privacy: every audit verdict.

Writes benchmarks/results/diversity.json and the `<!-- diversity.py -->` table of BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runner import (EvaluatedRun, copy_run_without, parser_beside_run, provenance, sets,
                    unpersonal, write_table)
from unpersonal.evaluation.audit import AuditModels, audit_set
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import write_atomic
from unpersonal.stages.audit import load_audit_models

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONDITIONS = {
    "neighbours-8-w1": ("generate.pseudo_condition=neighbours", "generate.pseudo_neighbours=8",
                        "generate.guidance=1.0"),
    "neighbours-8-w0.5": ("generate.pseudo_condition=neighbours",
                          "generate.pseudo_neighbours=8", "generate.guidance=0.5"),
}
FIRST_CONDITION = "neighbours-8-w1"
LABELS_ONLY = "labels only (cpu preset)"
FIRST_ON_KEPT = f"{FIRST_CONDITION}, only the sources labels-only kept"


def released_from_sources(run: Path, label_names: list[str], sources: set[int]
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The images (float) and labels a run released for these positions of its order, and its
    generate.json."""
    released = read_synthetic_set(run / "generate" / "synthetic", label_names)
    position = accepted_positions(run)
    keep = np.array([position[name] in sources for name in released.names])
    summary = json.loads((run / "generate" / "generate.json").read_text())
    return released.images[keep], released.labels[keep], summary


def accepted_positions(run: Path) -> dict[str, int]:
    """The position in the run's order of each released file's source."""
    with open(run / "generate" / "decisions.csv", newline="") as handle:
        return {row["synthetic_file"]: int(row["position"]) for row in csv.DictReader(handle)
                if row["outcome"].startswith("accepted")}


def score_release(evaluated: EvaluatedRun, models: AuditModels, images: np.ndarray,
                  labels: np.ndarray, summary: dict[str, Any] | None) -> dict[str, Any]:
    """Utility and fidelity beside the run's real-trained classifiers, and the audit with the
    run's audit models (`models`, loaded once for every release)."""
    figures = evaluated.score(images, labels)
    audit, _ = audit_set(models, images, evaluated.config.audit, evaluated.config.seed)
    figures["audit_passed"] = audit["tests"]["passed"]
    figures["audit_failed"] = [name for name, test in audit["tests"]["by_figure"].items()
                               if test["rejected"]]
    figures["reid_rate"] = audit["reid_rate"]
    if summary is not None:
        figures["nfe_per_accepted"] = summary["nfe_per_accepted"]
        figures["candidates_per_source"] = summary["candidates_per_source_mean"]
        figures["acceptance_rate"] = summary["acceptance_rate"]
    print(f"  AUC {figures['auc']:.4f} (real {figures['auc_real']:.4f}), coverage "
          f"{figures['coverage']:.3f}, recall {figures['recall']:.3f}, retrieval "
          f"{figures['retrieval']:.3f}, audit {'pass' if figures['audit_passed'] else 'FAIL'}",
          flush=True)
    return figures


def release_folders(run: Path, sources: int) -> dict[str, tuple[Path, set[int]]]:
    """Each release of the results: the run copy that generated it and the sources it keeps."""
    first = set(range(sources))
    folders = {LABELS_ONLY: (run, first)}
    for name in CONDITIONS:
        folders[name] = (run.with_name(f"{run.name}-{name}"), first)
    # The sources the labels-only search kept: a release without the others tells whether
    # the sources it skipped are what the other releases lose utility on.
    kept = first & set(accepted_positions(run).values())
    folders[FIRST_ON_KEPT] = (folders[FIRST_CONDITION][0], kept)
    return folders


def reaudit(run: Path, name: str) -> None:
    """Every release of `NAME.json` audited again with the audit as it is now (the images read
    back from the run copies that made them); the other figures are kept."""
    results = RESULTS / f"{name}.json"
    result = json.loads(results.read_text())
    evaluated = EvaluatedRun.load(run, result["classifier_seeds"])
    models = load_audit_models(evaluated.config, evaluated.run, evaluated.dataset)
    names = evaluated.dataset.label_names
    for release, (folder, sources) in release_folders(run, result["sources"]).items():
        if release not in result["releases"]:
            continue
        images, _, _ = released_from_sources(folder, names, sources)
        audit, _ = audit_set(models, images, evaluated.config.audit, evaluated.config.seed)
        figures = result["releases"][release]
        figures["audit_passed"] = audit["tests"]["passed"]
        figures["audit_failed"] = [test for test, verdict in audit["tests"]["by_figure"].items()
                                   if verdict["rejected"]]
        figures["reid_rate"] = audit["reid_rate"]
        print(f"{release}: audit {'pass' if figures['audit_passed'] else 'FAIL'} "
              f"{figures['audit_failed']}", flush=True)
    result["audited_again"] = provenance()
    write_atomic(results, json.dumps(result, indent=2) + "\n")


def table(result: dict[str, Any]) -> str:
    lines = ["| release | images | synthetic-only ROC-AUC (gap to real, pp) | FD | precision | "
             "recall | coverage | retrieval | NFE per image | audit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["releases"].items():
        lines.append(
            f"| {name} | {r['images']:,} | {r['auc']:.4f} ({r['gap_pp']:+.2f}) | {r['fd']:.4f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['coverage']:.3f} | "
            f"{r['retrieval']:.3f} | "
            f"{format(r['nfe_per_accepted'], '.1f') if 'nfe_per_accepted' in r else '-'} | "
            f"{'passes' if r['audit_passed'] else 'fails ' + ', '.join(r['audit_failed'])} |")
    return "\n".join(lines)


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


def trainings_markdown(table: dict[str, dict[str, Any]]) -> str:
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


def report_trainings(prefix: str, trainings: int, out: Path, marker: str) -> str:
    """The table over trainings from `PREFIX-t.json` (t = 0 .. trainings - 1, those that exist),
    into `out` and BENCHMARKS.md between the `marker` markers; returns the table."""
    files = [RESULTS / f"{prefix}-{t}.json" for t in range(trainings)]
    results = [json.loads(f.read_text()) for f in files if f.is_file()]
    if not results:
        sys.exit(f"no results yet: {files[0]} and the others are missing")
    over = over_trainings(results)
    write_atomic(out, json.dumps({**provenance(), "trainings": [r["run"] for r in results],
                                  "releases": over}, indent=2) + "\n")
    text = trainings_markdown(over)
    write_table(ROOT / "BENCHMARKS.md", marker, text)
    return text


def main() -> None:
    parser = parser_beside_run(__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=2240,
                        help="sources of the run's order drawn for (a multiple of "
                             "generate.block_size keeps the blocks whole; 0: every one)")
    parser.add_argument("--name", default="diversity",
                        help="results file benchmarks/results/NAME.json, and the table of "
                             "BENCHMARKS.md between the markers NAME.py, where they exist")
    parser.add_argument("--report-trainings", type=int, metavar="N",
                        help="draw nothing: the table over trainings of NAME-0.json .. "
                             "NAME-(N-1).json into NAME-trainings.json and BENCHMARKS.md "
                             "(markers NAME.py trainings)")
    parser.add_argument("--reaudit", action="store_true",
                        help="draw nothing: audit the releases of NAME.json again with the "
                             "audit as it is now, keeping their other figures")
    options = parser.parse_args()
    if options.reaudit:
        reaudit(options.run, options.name)
        return
    if options.report_trainings:
        print(report_trainings(options.name, options.report_trainings,
                               RESULTS / f"{options.name}-trainings.json",
                               f"{options.name}.py trainings"))
        return
    if not (options.run / "eval" / "test_probs.npz").is_file():
        sys.exit(f"{options.run} is not evaluated: run benchmarks/kermany.py first")
    evaluated = EvaluatedRun.load(options.run, options.seeds)
    names = evaluated.dataset.label_names
    options.sources = options.sources or int((evaluated.dataset.split == "train").sum())
    results = RESULTS / f"{options.name}.json"
    models = load_audit_models(evaluated.config, evaluated.run, evaluated.dataset)
    result: dict[str, Any] = {**provenance(), "run": options.run.name,
                              "sources": options.sources, "classifier_seeds": options.seeds,
                              "releases": {}}
    folders = release_folders(options.run, options.sources)
    run, first = folders[LABELS_ONLY]
    images, labels, summary = released_from_sources(run, names, first)
    print(f"labels only ({len(images):,} images):", flush=True)
    result["releases"][LABELS_ONLY] = {
        "images": len(images), **score_release(evaluated, models, images, labels, summary)}
    for name, overrides in CONDITIONS.items():
        copy, sources = folders[name]
        if not (copy / "generate" / "generate.json").is_file():
            copy_run_without(options.run, copy)
        unpersonal("generate", "--out", str(copy),
                   *sets(*overrides, f"generate.count={options.sources}"))
        images, labels, summary = released_from_sources(copy, names, sources)
        print(f"{name} ({len(images):,} images):", flush=True)
        result["releases"][name] = {"images": len(images), "settings": list(overrides),
                                    **score_release(evaluated, models, images, labels, summary)}
        if name == FIRST_CONDITION:
            kept_copy, kept = folders[FIRST_ON_KEPT]
            images, labels, _ = released_from_sources(kept_copy, names, kept)
            print(f"{FIRST_ON_KEPT} ({len(images):,} images):", flush=True)
            result["releases"][FIRST_ON_KEPT] = {
                "images": len(images), "settings": list(overrides),
                **score_release(evaluated, models, images, labels, None)}
        write_atomic(results, json.dumps(result, indent=2) + "\n")
    write_atomic(results, json.dumps(result, indent=2) + "\n")
    write_table(ROOT / "BENCHMARKS.md", f"{options.name}.py", table(result))


if __name__ == "__main__":
    main()
