"""What the privacy filter's check costs per candidate, on a finished run's released images.

    .venv/bin/python benchmarks/filter_cost.py [--run runs/bench-kermany-32] [--images 1000]

Times `PrivacyFilter.check` on the first `--images` released images (median of `--repeats`),
each checked as a candidate drawn from the labels alone, as the cpu preset's `generate` checks
them. To compare two versions of the filter, run it at each commit on the same run, one after
the other; BENCHMARKS.md quotes such a pair. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from runner import provenance
from unpersonal.config import load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import RunDir
from unpersonal.stages.calibrate import load_filter

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-kermany-32")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(config_file=args.run / "config.yaml")
    dataset = load_canonical(args.run / "prepare")
    privacy_filter = load_filter(config, RunDir(args.run))
    images = read_synthetic_set(args.run / "generate" / "synthetic",
                                dataset.label_names).images[:args.images]
    sources = np.arange(len(images)) % int((dataset.split == "train").sum())
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        privacy_filter.check(images, sources, drawn_from_source=False)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"images": len(images), "median_s": round(float(np.median(seconds)), 2),
                      "ms_per_candidate": round(1000 * float(np.median(seconds)) / len(images), 1),
                      **provenance()}))


if __name__ == "__main__":
    main()
