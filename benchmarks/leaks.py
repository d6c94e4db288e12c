"""Positive controls: releases that do leak, dose by dose, through the audit and the filter.

    .venv/bin/python benchmarks/leaks.py                 # the headline run of benchmarks/kermany.py
    .venv/bin/python benchmarks/leaks.py --run RUN --clean 20 --shares 0.001 0.005 0.01 0.05

From a finished run (its released set, the audit's models, the filter and the diffusion model):

* clean releases: `--clean` bootstrap resamples of the released set, each audited with its own
  seed, and `--clean` honest releases (half the held-out patients' real images audited against
  the other half, `honest_releases`): the share of each that passes every verdict together
  (target: at least 95% of both). The resamples share one baseline, from which the tests'
  cutoffs come, so they are not independent trials; the honest releases each draw their own;
* leaked releases: for every kind of `privacy.leaks` and every share p, the released set with
  p of its images replaced by leaks of that kind (the same leaked images at every share, the
  smaller doses a subset of the larger): each test's p-value after Holm's correction and the
  verdict of all of them (target: every release with 1% leaked fails; aim: 0.5%);
* the filter on the leaked images themselves, each checked as a candidate drawn from the labels
  alone (the cpu preset's generate) for a random other training image: the share rejected per
  kind (targets: at least 99% of copies of every kind, 90% of identity probes), beside the
  share of held-out patients' real images (the test split, which the filter was not calibrated
  on) it rejects (at most 5%);
* what each kind's leaks are by exhaustive aligned-pixel matching (`runner.IndependentCopies`,
  below the test split's closest real image): the share of them that are pixel copies of a
  training image. It tells the model's renditions that stay copies from those that do not;
  crops and rotations, which the pixel metric does not align, it does not count.

The targets were fixed before the leak results were seen; a miss is reported as it is.

Each image is described for the audit once (`AuditModels.describe`) and releases are assembled
from those rows, so the figures are those of `audit_set` on the assembled images. Writes
benchmarks/results/leaks.json and its table into BENCHMARKS.md between the `<!-- leaks.py -->`
markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner import IndependentCopies, provenance, write_table
from unpersonal.config import Config, load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.audit import AuditModels, SetVectors, audit_vectors
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.privacy.leaks import (DEFAULT_MODEL_SIGMAS, IDENTITY_PROBE, leak_count,
                                      leak_kinds, leak_positions, make_leaks)
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.sampling.sampler import load_sampler
from unpersonal.stages.audit import load_audit_models
from unpersonal.stages.calibrate import load_filter
from unpersonal.torch_utils import pick_device

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "leaks.json"
SHARES = (0.001, 0.005, 0.01, 0.05)
CLEAN_PASS_TARGET = 0.95
FAIL_AT_SHARE = 0.01
FILTER_COPY_RECALL_TARGET = 0.99
FILTER_PROBE_RECALL_TARGET = 0.90
FILTER_HELDOUT_REJECTION_LIMIT = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--clean", type=int, default=20,
                        help="clean resamples and honest releases audited")
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_MODEL_SIGMAS),
                        help="noise levels of the diffusion model's near-copies")
    parser.add_argument("--kinds", nargs="+", default=None,
                        help="only these leak kinds (default: every kind)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    run = RunDir(args.run)
    if not (args.run / "generate" / "synthetic" / "labels.csv").is_file():
        sys.exit(f"{args.run} has no released set: run benchmarks/kermany.py first")
    config = load_config(config_file=args.run / "config.yaml")
    dataset = load_canonical(run.stage_path("prepare"))
    train = dataset.subset("train")
    released = read_synthetic_set(run.stage_path("generate") / "synthetic", dataset.label_names)
    models = load_audit_models(config, run, dataset)
    clean = models.describe(released.images)
    size = len(clean)
    print(f"release: {size:,} images; held-out ({models.heldout_split}): "
          f"{len(models.heldout):,}", flush=True)

    def audit(vectors: SetVectors, seed: int) -> dict[str, Any]:
        figures, _ = audit_vectors(models, vectors, config.audit, seed)
        return _summary(figures)

    result: dict[str, Any] = {"release_images": size, "heldout_split": models.heldout_split,
                              "heldout_images": len(models.heldout), "shares": args.shares,
                              "alpha": config.audit.alpha}
    result["clean"] = audit(clean, config.seed)
    resamples = []
    for draw in range(args.clean):
        rows = np.random.default_rng([config.seed, 31, draw]).integers(0, size, size)
        resamples.append(audit(clean.take(rows), config.seed + 1 + draw))
        print(f"clean resample {draw + 1}/{args.clean}: "
              f"{'pass' if resamples[-1]['passed'] else 'FAIL'}", flush=True)
    result["clean_resamples"] = {
        "count": args.clean,
        "passed": float(np.mean([r["passed"] for r in resamples])) if resamples else None,
        "failed_by": _failures(resamples)}
    result["honest_releases"] = honest_releases(models, config, args.clean)

    sampler = load_sampler(run.stage_path("fit-diffusion"), train, config.sampling, 1.0,
                           pick_device())
    privacy_filter = load_filter(config, run)
    rng = np.random.default_rng([config.seed, 37])
    most = leak_count(size, max(args.shares))
    train_images = train.images_float()
    probes = dataset.subset("probe").images_float()
    copies = IndependentCopies(args.run)
    kinds = args.kinds or leak_kinds(tuple(args.sigmas))
    result["kinds"] = {}
    for kind in kinds:
        kind_started = time.perf_counter()
        if kind == IDENTITY_PROBE and len(probes) == 0:
            result["kinds"][kind] = {"skipped": "the run has no identity probes (prepared "
                                                "before prepare held them back)"}
            print(f"{kind}: skipped (no identity probes in this run)", flush=True)
            continue
        try:
            leaks = make_leaks(kind, train_images, train.patient_id, min(most, len(probes))
                               if kind == IDENTITY_PROBE else most, config.seed,
                               renoise=sampler.renoise, probes=probes)
        except ValueError as error:  # e.g. fewer single-image patients than leaks asked for
            result["kinds"][kind] = {"skipped": str(error)}
            print(f"{kind}: skipped ({error})", flush=True)
            continue
        leak_vectors = models.describe(leaks.images)
        doses = {}
        for share in args.shares:
            count = leak_count(size, share)
            if count > len(leaks.images):
                continue  # more identity probes than the run holds
            positions = leak_positions(size, count, config.seed)
            vectors = clean.replaced(positions, leak_vectors.take(np.arange(count)))
            doses[f"{share:g}"] = {"leaked": count, **audit(vectors, config.seed)}
        sources = _other_rows(np.full(len(leaks.rows), -1) if kind == IDENTITY_PROBE
                              else leaks.rows, len(train), rng)
        checked = privacy_filter.check(leaks.images, sources, drawn_from_source=False)
        result["kinds"][kind] = {
            "doses": doses,
            "filter_recall": float(checked.rejected.mean()),
            "independent_copies": copies(leaks.images),
            "filter_recall_by_check": {check: float(flags.mean())
                                       for check, flags in checked.flags.items()},
            "seconds": round(time.perf_counter() - kind_started, 1)}
        print(f"{kind}: " + ", ".join(
            f"{share} {'fail' if not d['passed'] else 'pass'}" for share, d in doses.items())
            + f"; filter recall {result['kinds'][kind]['filter_recall']:.3f}", flush=True)

    test = dataset.subset("test")
    held = privacy_filter.check(test.images_float(), _other_rows(np.full(len(test), -1),
                                                               len(train), rng),
                                drawn_from_source=False)
    result["filter_heldout_rejection"] = float(held.rejected.mean())
    result["targets"] = _targets(result, args.shares)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result.update(provenance())
    write_atomic(args.results, json.dumps(result, indent=2) + "\n")
    if args.results == RESULTS:
        write_table(ROOT / "BENCHMARKS.md", "leaks.py", _table(result))
    print(json.dumps(result["targets"], indent=2))


def honest_releases(models: AuditModels, config: Config, count: int) -> dict[str, Any]:
    """Releases honest by definition: the real images of a random half of the held-out
    patients, audited against the other half as the baseline (`AuditModels.with_baseline`).
    Unlike resamples of the released set, each draws a new baseline, which is what the tests'
    cutoffs come from, so the share that fails estimates the audit's false alarm rate."""
    audits, sizes = [], []
    patients = models.heldout.patient_id
    distinct = np.unique(patients)
    for draw in range(count):
        half = np.random.default_rng([config.seed, 41, draw]).permutation(
            distinct)[: len(distinct) // 2]
        released = np.isin(patients, half)
        figures, _ = audit_vectors(models.with_baseline(~released),
                                   models.heldout_vectors.take(np.flatnonzero(released)),
                                   config.audit, config.seed + 1 + draw)
        audits.append(_summary(figures))
        sizes.append(int(released.sum()))
        print(f"honest release {draw + 1}/{count} ({sizes[-1]} held-out images against "
              f"{len(patients) - sizes[-1]}): {'pass' if audits[-1]['passed'] else 'FAIL'}",
              flush=True)
    return {"count": count,
            "passed": float(np.mean([a["passed"] for a in audits])) if audits else None,
            "failed_by": _failures(audits), "release_images": sizes}


def _summary(figures: dict[str, Any]) -> dict[str, Any]:
    """Of one audit: the verdict, each test's adjusted p-value, and the headline figures."""
    tests = figures["tests"]
    return {"passed": tests["passed"],
            "p_adjusted": {name: round(t["p_adjusted"], 6)
                           for name, t in tests["by_figure"].items()},
            "reid_rate": figures["reid_rate"]["synthetic"],
            "dcr_share_below": {space: d["synthetic_share_below"]
                                for space, d in figures["dcr"].items()},
            "mia_auc": {attack: figures["membership_inference"][attack]["auc"]
                        for attack in ("distance", "density_ratio")},
            "pso_excess": figures["singling_out"]["max_excess"]}


def _failures(audits: list[dict[str, Any]]) -> dict[str, int]:
    """How many audits each test failed."""
    names = audits[0]["p_adjusted"] if audits else {}
    return {name: sum(a["p_adjusted"][name] <= 0.05 for a in audits) for name in names}


def _other_rows(rows: np.ndarray, n_train: int, rng: np.random.Generator) -> np.ndarray:
    """A random training row for each leak, never the one it leaks: the source generate would
    have drawn it for from the labels alone."""
    other = rng.integers(0, n_train - 1, len(rows))
    return np.where(other >= rows, other + 1, other) if n_train > 1 else other


def _targets(result: dict[str, Any], shares: list[float]) -> dict[str, Any]:
    kinds = {kind: r for kind, r in result["kinds"].items() if "doses" in r}
    at_share = f"{FAIL_AT_SHARE:g}"
    caught = {kind: not r["doses"][at_share]["passed"] for kind, r in kinds.items()
              if at_share in r["doses"]}
    copies = {kind: r["filter_recall"] for kind, r in kinds.items() if kind != IDENTITY_PROBE}
    probe = kinds.get(IDENTITY_PROBE, {}).get("filter_recall")
    return {
        "clean_pass_rate": result["clean_resamples"]["passed"],
        "clean_pass_rate_met": (None if result["clean_resamples"]["passed"] is None
                                else result["clean_resamples"]["passed"] >= CLEAN_PASS_TARGET),
        "honest_pass_rate": result["honest_releases"]["passed"],
        "honest_pass_rate_met": (None if result["honest_releases"]["passed"] is None
                                 else result["honest_releases"]["passed"] >= CLEAN_PASS_TARGET),
        "audit_fails_at_1pct": caught, "audit_fails_at_1pct_met": all(caught.values()),
        "smallest_failing_share": {
            kind: min((float(s) for s, d in r["doses"].items() if not d["passed"]), default=None)
            for kind, r in kinds.items()},
        "filter_recall": copies,
        "filter_recall_met": all(v >= FILTER_COPY_RECALL_TARGET for v in copies.values()),
        "filter_recall_identity_probes": probe,
        "filter_recall_identity_probes_met": (None if probe is None
                                              else probe >= FILTER_PROBE_RECALL_TARGET),
        "filter_heldout_rejection": result["filter_heldout_rejection"],
        "filter_heldout_rejection_met":
            result["filter_heldout_rejection"] <= FILTER_HELDOUT_REJECTION_LIMIT}


def _table(result: dict[str, Any]) -> str:
    shares = [f"{s:g}" for s in result["shares"]]
    head = ("| leak kind | " + " | ".join(f"{float(s):.1%} leaked" for s in shares)
            + " | filter rejects | copies by pixels |\n|---|" + "---|" * len(shares)
            + "---:|---:|\n")
    rows = []
    for kind, r in result["kinds"].items():
        if "doses" not in r:
            rows.append(f"| {kind} | skipped: {r['skipped']} |")
            continue
        cells = []
        for share in shares:
            if share not in r["doses"]:
                cells.append("n/a (too few)")
                continue
            dose = r["doses"][share]
            worst = min(dose["p_adjusted"], key=dose["p_adjusted"].get)
            cells.append(("**fails**" if not dose["passed"] else "passes")
                         + f" ({worst} p={dose['p_adjusted'][worst]:.2g})")
        independent = r.get("independent_copies")
        rows.append(f"| {kind} | " + " | ".join(cells) + f" | {r['filter_recall']:.1%} | "
                    + (f"{independent['rate']:.1%}" if independent else "") + " |")
    clean = result["clean_resamples"]
    if clean["passed"] is not None:
        rows.append(f"| none (clean, {clean['count']} resamples) | passes "
                    f"{clean['passed']:.0%} of them |" + " |" * (len(shares) - 1)
                    + f" {result['filter_heldout_rejection']:.1%} of held-out real images | |")
    honest = result["honest_releases"]
    if honest["passed"] is not None:
        rows.append(f"| none (honest: half the held-out patients against the other half, "
                    f"{honest['count']} splits) | passes {honest['passed']:.0%} of them |"
                    + " |" * (len(shares) - 1) + " | |")
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
