"""Wall time of `unpersonal prepare`, as a user runs it (a fresh process each time).

    .venv/bin/python benchmarks/prepare.py            # writes benchmarks/results/prepare.json

Cases: the built-in phantoms at the demo and cpu presets, and the Kermany chest X-rays in
../shared/data (64 px as is; 128 px resized to 64; 128 px kept) when that folder is present.
Each case runs `--repeats` times with --force; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def cases() -> list[tuple[str, list[str]]]:
    found = [("phantoms, demo preset (150 patients, 32 px)", ["--preset", "demo"]),
             ("phantoms, 200 patients, 64 px", ["--preset", "cpu", "--set", "data.resolution=64"])]
    if (SHARED / "kermany_cxr_64.npz").is_file():
        k64, k128 = str(SHARED / "kermany_cxr_64.npz"), str(SHARED / "kermany_cxr_128.npz")
        found += [
            ("Kermany 64 px npz kept at 64 px", ["--data", k64, "--set", "data.resolution=64"]),
            ("Kermany 64 px npz resized to 32 px (cpu preset)", ["--data", k64]),
            ("Kermany 128 px npz resized to 64 px", ["--data", k128, "--set", "data.resolution=64"]),
            ("Kermany 128 px npz kept at 128 px (gpu preset)", ["--data", k128, "--preset", "gpu"]),
        ]
    return found


def time_case(args: list[str], repeats: int) -> list[float]:
    binary = Path(sys.executable).with_name("unpersonal")
    times = []
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([str(binary), "prepare", "--out", str(run), "--force", *args],
                           check=True, capture_output=True)
            times.append(time.perf_counter() - start)
            shutil.rmtree(run)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare.json")
    options = parser.parse_args()
    rows = []
    for name, args in cases():
        times = time_case(args, options.repeats)
        rows.append({"case": name, "median_s": round(statistics.median(times), 3),
                     "min_s": round(min(times), 3), "max_s": round(max(times), 3)})
        print(f"| {name} | {rows[-1]['median_s']:.2f} | {rows[-1]['min_s']:.2f}-"
              f"{rows[-1]['max_s']:.2f} |", flush=True)
    result = {"command": "python benchmarks/prepare.py --repeats " + str(options.repeats),
              "machine": f"{platform.machine()}, {_cores()} cores, {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "repeats": options.repeats, "rows": rows}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
