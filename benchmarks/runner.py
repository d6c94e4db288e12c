"""What the benchmark scripts share: running the CLI as a user would, and copying a run.

Imported as `runner` by the scripts beside it (`python benchmarks/x.py` puts this folder on the
path).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOWNSTREAM = ("generate", "audit", "eval", "report", "export")
# The reference recipe (DESIGN.md section 5): all K=32 candidates, EDM Heun with 32 steps
# (63 NFE), classifier-free guidance against the null condition, the re-ID check against the
# source image only with a fixed threshold of 0.5, no distance floors, and the least divergent
# survivor kept whatever its divergence.
REFERENCE = ("generate.mode=best", "generate.candidates=32", "generate.attempts=1",
             "sampling.solver=heun", "sampling.steps=32", "sampling.guide=cfg",
             "sampling.guidance_against=empty",
             "generate.reid_check=source", "generate.reid_threshold=0.5",
             "generate.distance_floors=false", "generate.label_gate=false")
REFERENCE_GUIDANCE = 2.0


def unpersonal(*args: str) -> float:
    """Run one CLI command of this environment; returns its wall time in seconds."""
    command = [str(Path(sys.executable).with_name("unpersonal")), *args]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - started, 1)


def sets(*overrides: str) -> list[str]:
    """`--set` arguments for config overrides."""
    return [part for item in overrides for part in ("--set", item)]


def copy_run_without(run: Path, target: Path, stages: tuple[str, ...] = DOWNSTREAM) -> Path:
    """A copy of a trained run (at `target`, replaced) in which `stages` must run again."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(*stages, ".work", ".partial"))
    manifest = json.loads((target / "manifest.json").read_text())
    for stage in stages:
        manifest["stages"].pop(stage, None)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
