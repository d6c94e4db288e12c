"""The cost curve: time and peak memory of each stage as the training set grows (phantoms).

    .venv/bin/python benchmarks/cost_curve.py [--images 1000 5000 20000] [--sources 500]
    .venv/bin/python benchmarks/cost_curve.py --remeasure calibrate generate audit  # after a change

For each size N, a phantom run at the demo preset (32 px) with about N training images
(`runs/cost-N`), each stage run by its own `unpersonal` command in a child process, timed by
the wall clock and measured for peak resident memory (the child's `ru_maxrss`): prepare, the
filter's models (fit-embedder, fit-reid, calibrate), fit-classifier, fit-diffusion, generate,
and the audit (`unpersonal audit`: its own embedder and re-ID network, then the tests; with
`--remeasure audit`, the tests alone, the models being up to date).

Training budgets are fixed in steps, so a training stage grows with N only through what it does
once per image (features of every image, validation passes). generate draws for `--sources`
sources (`generate.count`) whatever N; its time is counted as N sources would take: the
setup (loading, embedding the N training images) as measured, plus N times the search time per
source (generate.json's seconds), which carries the growth in N since each candidate is compared
with all N training images. The audit judges that release against N training images.

Fits log(seconds) = a + b log(N) per stage over the sizes (b: the growth exponent) and projects
each stage to 100,000 training images. A size already measured is kept (`runs/cost-N/cost.json`);
delete that file to measure it again. Writes `benchmarks/results/cost_curve.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runner import commit, provenance, sets
from unpersonal.config import load_config
from unpersonal.rundir import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cost_curve.json"
STAGES = ("prepare", "fit-embedder", "fit-reid", "calibrate", "fit-classifier", "fit-diffusion",
          "generate", "audit")
# Phantoms: 1-6 scans a patient, the demo preset's share of patients in training.
IMAGES_PER_PATIENT = 3.5 * load_config("demo").data.split_fractions[0]
PROJECT_TO = 100_000


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of one child process."""
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command[1:3])} failed")
    return round(seconds, 1), round(usage.ru_maxrss / 1024, 1)  # Linux: ru_maxrss in KiB


def measure(images: int, sources: int, extra: list[str],
            remeasure: tuple[str, ...] = ()) -> dict[str, Any]:
    """One size's stages, or what an earlier invocation measured (but the `remeasure` stages,
    run again on that run's other stages)."""
    run = ROOT / "runs" / f"cost-{images}"
    saved = run / "cost.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else None
    if earlier is not None and not remeasure:
        return earlier
    patients = max(4, round(images / IMAGES_PER_PATIENT))
    executable = str(Path(sys.executable).with_name("unpersonal"))
    common = ["--out", str(run), *sets(f"phantoms.n_patients={patients}",
                                       f"generate.count={sources}"), *extra]
    figures = dict(earlier["stages"]) if earlier is not None else {}
    for stage in [s for s in STAGES if earlier is None or s in remeasure]:
        seconds, memory = timed([executable, stage, *common, "--force"])
        figures[stage] = {"seconds": seconds, "peak_mib": memory, "commit": commit()}
    train = json.loads((run / "prepare" / "dataset.json").read_text())["summary"]["splits"]["train"]
    searched = json.loads((run / "generate" / "generate.json").read_text())["seconds_total"]
    figures["generate"]["search_s_per_source"] = round(searched / sources, 4)
    figures["generate"]["setup_s"] = round(figures["generate"]["seconds"] - searched, 1)
    result = {"images_requested": images, "training_images": train["images"],
              "patients": patients, "sources": sources, "stages": figures}
    write_atomic(saved, json.dumps(result, indent=2) + "\n")
    return result


def growth(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: the fitted exponent b of seconds ~ N^b and the projection to 100k images
    (generate: per source, times N sources)."""
    n = np.array([s["training_images"] for s in sizes], dtype=float)
    out = {}
    for stage in STAGES:
        if stage == "generate":  # every training image a source: the setup, then the search
            seconds = np.array([s["stages"][stage]["setup_s"] for s in sizes]) + n * np.array(
                [s["stages"][stage]["search_s_per_source"] for s in sizes])
        else:
            seconds = np.array([s["stages"][stage]["seconds"] for s in sizes])
        memory = np.array([s["stages"][stage]["peak_mib"] for s in sizes])
        slope, intercept = np.polyfit(np.log(n), np.log(seconds), 1)
        memory_slope = np.polyfit(np.log(n), np.log(memory), 1)[0]
        out[stage] = {"seconds": seconds.round(1).tolist(), "exponent": round(float(slope), 2),
                      "peak_mib": memory.tolist(),
                      "memory_exponent": round(float(memory_slope), 2),
                      f"projected_s_at_{PROJECT_TO}": round(float(np.exp(intercept)
                                                                  * PROJECT_TO ** slope))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--sources", type=int, default=500,
                        help="sources generate draws for at every size (time scaled to N)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override for every run (e.g. a smaller model to try it)")
    parser.add_argument("--remeasure", nargs="+", choices=STAGES, default=(),
                        help="run these stages again at every size measured before (after a "
                        "change to them), keeping the other stages' figures")
    options = parser.parse_args()
    sizes = [measure(images, options.sources, sets(*options.overrides),
                     tuple(options.remeasure)) for images in sorted(options.images)]
    results = {**provenance(), "sizes": sizes,
               "growth": growth(sizes) if len(sizes) > 1 else None}
    write_atomic(RESULTS, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["growth"], indent=2))


if __name__ == "__main__":
    main()
