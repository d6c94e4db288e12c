"""`make demo` on a fresh clone, timed: environment, then every stage on the phantoms.

    .venv/bin/python benchmarks/demo.py        # about 10 min on 2 cores; see BENCHMARKS.md

Clones this repository (its committed HEAD) into a temporary folder, runs `make demo` there as a
new user would, checks that runs/demo/report/index.html and runs/demo/export/ exist, and writes
benchmarks/results/demo.json with the wall time (environment creation included, and the
pipeline's share apart), each stage's time, and the release's verdicts and classifier figures
as its datasheet states them.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner import commit, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    measured_on = provenance()  # before the clone: the matmul rate of an idle machine
    with tempfile.TemporaryDirectory(prefix="unpersonal-demo-") as scratch:
        clone = Path(scratch) / "unpersonal"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        started = time.perf_counter()
        install = subprocess.run(["make", "install"], cwd=clone, capture_output=True, text=True)
        installed = time.perf_counter()
        if install.returncode != 0:
            sys.exit(f"make install failed:\n{install.stderr[-3000:]}")
        demo = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True)
        finished = time.perf_counter()
        if demo.returncode != 0:
            sys.exit(f"make demo failed:\n{demo.stderr[-3000:]}")
        report = clone / "runs" / "demo" / "report" / "index.html"
        export = clone / "runs" / "demo" / "export"
        if not report.is_file() or not (export / "README.md").is_file():
            sys.exit("make demo finished without runs/demo/report/index.html or runs/demo/export")
        run = clone / "runs" / "demo"
        summary = json.loads((run / "generate" / "generate.json").read_text())
        sheet = json.loads((export / "datasheet.json").read_text())
        stages = json.loads((run / "manifest.json").read_text())["stages"]
        images = len(list((export / "images").glob("*.png")))
        cloned = commit(clone)
    results = {
        "wall_time_s": round(finished - started, 1),
        "environment_s": round(installed - started, 1),
        "pipeline_s": round(finished - installed, 1),
        "released_images": images, "acceptance_rate": summary["acceptance_rate"],
        "prints_locations": bool(re.search(r"report \(internal", demo.stderr)),
        "stage_seconds": {name: stage["seconds"] for name, stage in stages.items()},
        "verdicts": [{"figure": v["figure"], "value": v["value"], "passed": v["passed"]}
                     for v in sheet["privacy"]["verdicts"]],
        "every_verdict_passed": all(v["passed"] is not False
                                    for v in sheet["privacy"]["verdicts"]),
        "classification_auc": sheet["utility"]["classification_auc"],
        "classification_auc_ci95": sheet["utility"]["classification_auc_ci95"],
        "gap_pp": sheet["utility"]["gap_pp"],
        **measured_on, "python": platform.python_version(), "commit": cloned,
        "command": "make demo (fresh clone; timed by python benchmarks/demo.py)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
