"""Filtered generation on real chest X-rays: our recipe against the reference recipe, side by side.

    .venv/bin/python benchmarks/generate.py        # Kermany at 32 px, cpu preset; see BENCHMARKS.md

Through the CLI, as a user would, in one run directory (runs/bench-kermany-32, which
benchmarks/kermany.py reuses): prepare ../shared/data/kermany_cxr_64.npz with the cpu preset
(32 px), fit-embedder, fit-reid, calibrate, fit-classifier, fit-diffusion (class + pseudo
conditioning), then

* ours: `unpersonal generate` with the config's defaults, one accepted image per training image;
* the reference recipe on the first `--reference-sources` sources of the same order, in a copy
  of the run kept beside it (runs/bench-kermany-32-reference, shared with benchmarks/kermany.py):
  K = 32 candidates all drawn (best mode), EDM Heun with 32 steps (63 NFE) and
  classifier-free guidance against the null condition, the re-ID check against the source image
  only with a fixed threshold of 0.5, no distance floors; and how many of the images it accepts
  our filter would still reject.

Writes benchmarks/results/generate.json. Images stay in the run directories (runs/, not
committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from runner import REFERENCE_GUIDANCE, copy_run_without, cores, reference_run, sets, unpersonal

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("fit-embedder", "fit-reid", "calibrate", "fit-classifier", "fit-diffusion")


def build_models(run: Path, overrides: list[str]) -> dict[str, float]:
    seconds = {"prepare": unpersonal("prepare", "--data", str(DATA), "--out", str(run),
                                     "--preset", "cpu", *sets(*overrides))}
    for stage in MODELS:
        seconds[stage] = unpersonal(stage, "--out", str(run))
    return seconds


def generate(run: Path, *overrides: str, force: bool = False) -> tuple[dict, float]:
    wall = unpersonal("generate", "--out", str(run), *sets(*overrides),
                      *(["--force"] if force else []))
    return json.loads((run / "generate" / "generate.json").read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--reference-sources", type=int, default=40)
    parser.add_argument("--reference-guidance", type=float, default=REFERENCE_GUIDANCE,
                        help="classifier-free guidance weight of the reference recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for the whole run, e.g. diffusion.steps=100")
    parser.add_argument("--ours", action="append", default=[],
                        help="override for our generate only, e.g. sampling.steps=12")
    options = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"needs {DATA}")
    started = time.perf_counter()
    overrides = ["diffusion.conditioning=class+pseudo", *options.overrides]
    seconds = build_models(options.run, overrides)
    ours, seconds["generate"] = generate(options.run, *options.ours)
    subset_run = copy_run_without(options.run, options.run.with_name(options.run.name + "-subset"))
    subset, _ = generate(subset_run, *options.ours, f"generate.count={options.reference_sources}")
    shutil.rmtree(subset_run)
    reference = json.loads((reference_run(options.run, options.reference_sources,
                                          options.reference_guidance)
                            / "generate" / "generate.json").read_text())
    seconds["generate_reference"] = reference["seconds_total"]
    results = {
        "acceptance_rate": ours["acceptance_rate"],
        "rejections_by_reason": ours["rejections_by_reason"],
        "attempts_per_source_mean": ours["attempts_per_source_mean"],
        "candidates_per_source_mean": ours["candidates_per_source_mean"],
        "nfe_per_accepted_ours": ours["nfe_per_accepted"],
        "seconds_per_accepted_ours": ours["seconds_per_accepted"],
        # Generation time from the stage itself, so a rerun that finds it up to date still
        # reports what it cost (the command's wall time is then only the check).
        "generate_seconds_ours": ours["seconds_total"],
        "accepted_ours": ours["images"], "sources_ours": ours["sources"],
        "ours_on_reference_subset": {key: subset[key] for key in (
            "sources", "acceptance_rate", "nfe_per_accepted", "seconds_per_accepted",
            "rejections_by_reason")},
        "nfe_per_accepted_reference": reference["nfe_per_accepted"],
        "seconds_per_accepted_reference": reference["seconds_per_accepted"],
        "acceptance_rate_reference": reference["acceptance_rate"],
        "rejections_by_reason_reference": reference["rejections_by_reason"],
        "reference_accepted_that_our_filter_rejects": reference["accepted_strictly_rejected"],
        "reference_accepted": reference["images"],
        "reference_sources": reference["sources"],
        "nfe_ratio_reference_to_ours": round(
            reference["nfe_per_accepted"] / max(ours["nfe_per_accepted"], 1e-9), 1),
        "seconds_ratio_reference_to_ours": round(
            reference["seconds_per_accepted"] / max(ours["seconds_per_accepted"], 1e-9), 1),
        "settings_ours": ours["settings"], "settings_reference": reference["settings"],
        "stage_seconds": seconds,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {cores()} cores, torch threads default",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/generate.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
