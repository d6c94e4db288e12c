"""What each generation choice costs: selection mode, solver steps, guidance.

    .venv/bin/python benchmarks/generate_choices.py     # after benchmarks/generate.py

On the trained run of benchmarks/generate.py (runs/bench-kermany-32), runs `unpersonal generate`
on the first `--sources` sources once per choice below, each in its own copy of the run, and
records acceptance, rejections by check, candidates per source, NFE and seconds per accepted
image. Writes benchmarks/results/generate_choices.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from runner import copy_run_without, sets, unpersonal

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHOICES = {
    "cpu preset (first, K=8, DPM++ 16 steps, labels only: w=0)": (),
    "best of K=8": ("generate.mode=best",),
    "DPM++ 10 steps": ("sampling.steps=10",),
    "source embedding at w=1, no back-off": ("generate.guidance=1.0",
                                              "generate.guidance_floor=1.0"),
    "source embedding at w=0.5, no back-off": ("generate.guidance=0.5",
                                               "generate.guidance_floor=0.5"),
}
FIELDS = ("sources", "acceptance_rate", "candidate_pass_rate", "rejections_by_reason",
          "candidates_per_source_mean", "attempts_per_source_mean", "nfe_per_accepted",
          "seconds_per_accepted", "skipped_sources")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--sources", type=int, default=300)
    options = parser.parse_args()
    if not (options.run / "fit-diffusion" / "model.json").is_file():
        sys.exit(f"{options.run} has no trained model: run benchmarks/generate.py first")
    copy = options.run.with_name(options.run.name + "-choices")
    results = {}
    for name, overrides in CHOICES.items():
        copy_run_without(options.run, copy)
        wall = unpersonal("generate", "--out", str(copy),
                          *sets(*overrides, f"generate.count={options.sources}"))
        summary = json.loads((copy / "generate" / "generate.json").read_text())
        results[name] = {"overrides": list(overrides), "wall_s": wall,
                         **{field: summary[field] for field in FIELDS}}
        print(name, json.dumps(results[name]), flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    out = {"choices": results, "machine": f"{platform.machine()}, 2-core CPU",
           "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/generate_choices.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generate_choices.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
