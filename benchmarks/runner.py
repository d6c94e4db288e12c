"""What the benchmark scripts share: running the CLI as a user would, copying a run, and
scoring other sets beside an evaluated run.

Imported as `runner` by the scripts beside it (`python benchmarks/x.py` puts this folder on the
path).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unpersonal.config import Config, load_config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.privacy.floor import AlignedPixels
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages import downstream_of
from unpersonal.stages.evaluate import evaluate_run_set

# What a new release makes stale: generate and every stage that reads it.
DOWNSTREAM = ("generate", *downstream_of("generate"))
# The published method's recipe, as its reference implementation runs it: all K=32 candidates, EDM Heun with 32 steps
# (63 NFE), classifier-free guidance against the null condition, the re-ID check against the
# source image only with a fixed threshold of 0.5, no distance floors, and the least divergent
# survivor kept whatever its divergence.
REFERENCE = ("generate.mode=best", "generate.candidates=32", "generate.attempts=1",
             "sampling.solver=heun", "sampling.steps=32", "sampling.guide=cfg",
             "sampling.guidance_against=empty",
             "generate.reid_check=source", "generate.reid_threshold=0.5",
             "generate.distance_floors=false", "generate.label_gate=false",
             # Pinned, not inherited from the copied run's config: with guidance each batch
             # goes through the network twice, and 64 drew 4.9 ms per network evaluation
             # against 6.0 ms at 250 on the 2-core machine (BENCHMARKS.md).
             "sampling.batch_size=64")
REFERENCE_GUIDANCE = 2.0


def unpersonal(*args: str) -> float:
    """Run one CLI command of this environment; returns its wall time in seconds."""
    command = [str(Path(sys.executable).with_name("unpersonal")), *args]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - started, 1)


def write_table(document: Path, name: str, table: str) -> bool:
    """Put `table` in `document` between the lines `<!-- name -->` and `<!-- /name -->`, so
    that a rerun updates BENCHMARKS.md's table and leaves the prose around it alone.

    Returns False, changing nothing, when the document lacks either marker."""
    opening, closing = f"<!-- {name} -->\n", f"<!-- /{name} -->\n"
    text = document.read_text() if document.is_file() else ""
    start, end = text.find(opening), text.find(closing)
    if start < 0 or end < start:
        return False
    start += len(opening)
    # Blank lines around the table, so that Markdown does not read a marker as part of it.
    write_atomic(document, text[:start] + "\n" + table.strip("\n") + "\n\n" + text[end:])
    return True


def side_by_side(names: list[str], step: Callable[[str], None], rounds: int, steps: int,
                 batch: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Images per second of `step(name)` for each name, after one warm-up step each, in rounds
    that alternate between them so that machine noise hits all alike: (medians, every round)."""
    for name in names:
        step(name)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            for _ in range(steps):
                step(name)
            rates[name].append(steps * batch / (time.perf_counter() - start))
    return {name: round(statistics.median(r), 2) for name, r in rates.items()}, rates


def sets(*overrides: str) -> list[str]:
    """`--set` arguments for config overrides."""
    return [part for item in overrides for part in ("--set", item)]


def copy_run_without(run: Path, target: Path, stages: tuple[str, ...] = DOWNSTREAM) -> Path:
    """A copy of a trained run (at `target`, replaced) in which `stages` must run again."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(*stages, ".work", ".partial"))
    copied = RunDir(target)
    manifest = copied.manifest()
    for stage in stages:
        manifest["stages"].pop(stage, None)
    copied.write_manifest(manifest)
    return target


def transplant_stage(run: Path, stage: str, donor: Path) -> None:
    """Put `donor`'s trained `stage` into `run` in place of its own, to learn which stage's
    training a result follows (the same config, another seed's model).

    The manifest keeps `run`'s own key for the stage, so the CLI counts it as done under `run`'s
    config, and records the donor's output hashes, so every stage that reads it (their keys
    hash its outputs) runs again."""
    donor_record = RunDir(donor).stage_record(stage)
    if donor_record is None or not (donor / stage).is_dir():
        sys.exit(f"{donor} has no finished '{stage}' stage")
    recipient = RunDir(run)
    manifest = recipient.manifest()
    if stage not in manifest["stages"]:
        sys.exit(f"{run} has no finished '{stage}' stage to replace")
    shutil.rmtree(run / stage)
    shutil.copytree(donor / stage, run / stage)
    manifest["stages"][stage] = {**donor_record, "key": manifest["stages"][stage]["key"]}
    recipient.write_manifest(manifest)


def reference_run(run: Path, sources: int, guidance: float = REFERENCE_GUIDANCE) -> Path:
    """The reference recipe on the first `sources` sources, in a copy of the trained run kept
    beside it, so that the generate and headline benchmarks share one reference generation (and
    a rerun resumes it). The copy is made again when the run's models or calibration changed."""
    copy = run.with_name(run.name + "-reference")
    if _upstream_keys(copy) != _upstream_keys(run):
        copy_run_without(run, copy)
    unpersonal("generate", "--out", str(copy),
               *sets(*REFERENCE, f"generate.guidance={guidance}", f"generate.count={sources}"))
    return copy


def _upstream_keys(run: Path) -> dict[str, str] | None:
    if not (run / "manifest.json").is_file():
        return None
    stages = RunDir(run).manifest()["stages"]
    return {name: stage["key"] for name, stage in stages.items() if name not in DOWNSTREAM}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def provenance() -> dict[str, Any]:
    """Where, when and with what command a result was measured, for its results file: the
    command quoted as it would be typed, so that it reruns as it stands.

    Machines of one name differ: on 2026-12-07 a "2-core x86_64" multiplied float32 matrices at
    a fifth of the rate one did on 2026-11-22, and trained the same UNet 3.4x slower. So every
    result carries the CPU's name and its measured matrix-multiply rate, which say whether two
    files' times can be compared."""
    root = f"{Path(__file__).resolve().parents[1]}/"  # paths inside the project, as typed there
    return {"machine": f"{platform.machine()}, {cores()} cores", "cpu": cpu_name(),
            "matmul_gflops": round(peak_flops() / 1e9, 1), "date": time.strftime("%Y-%m-%d"),
            "command": shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}",
                                   *(arg.replace(root, "") for arg in sys.argv[1:])])}


def commit(repo: Path = Path(__file__).resolve().parents[1]) -> str:
    """The commit checked out in `repo`, with "+" when its tracked files have changes: which
    code a figure timed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True,
                              text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain",
                                                              "--untracked-files=no") else "")


def cpu_name() -> str:
    """The CPU's model name as Linux reports it ("unknown" elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), "unknown")


def peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """Best float32 matrix-multiply rate (FLOP/s) on torch's threads: what the cores reach on
    the most favourable kernel. Measured beside other work it reads low."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def parser_beside_run(description: str) -> argparse.ArgumentParser:
    """The options of a script that scores sets beside the headline run (`EvaluatedRun`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=Path, default=Path(__file__).resolve().parents[1] / "runs"
                        / "bench-kermany-32", help="the evaluated run of benchmarks/kermany.py")
    parser.add_argument("--seeds", type=int, default=5, help="classifier training seeds")
    return parser


@dataclass(frozen=True)
class EvaluatedRun:
    """An evaluated run of benchmarks/kermany.py, to score other sets beside it as `unpersonal
    evaluate` would (classifier utility and fidelity, no restoration), with its real-trained
    classifiers' test probabilities reused: the same seeds, not trained again."""

    run: RunDir
    config: Config
    dataset: CanonicalDataset
    real_probs: np.ndarray

    @classmethod
    def load(cls, folder: Path, seeds: int) -> "EvaluatedRun":
        probs_file = folder / "eval" / "test_probs.npz"
        if not probs_file.is_file():
            sys.exit("run benchmarks/kermany.py first")
        run = RunDir(folder)
        config = load_config(config_file=folder / "config.yaml")
        config.evaluate.classifier_seeds = seeds
        config.evaluate.restoration = False
        config.evaluate.real_plus_synthetic = False
        with np.load(probs_file) as saved:
            real_probs = saved["real"][:seeds]
        return cls(run, config, load_canonical(run.stage_path("prepare")), real_probs)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """ROC-AUC over the seeds beside real's, and fidelity, of one set (images float)."""
        metrics, _ = evaluate_run_set(self.config, self.run, self.dataset, images, labels,
                                      self.real_probs)
        classification, fidelity = metrics["utility"]["classification"], metrics["fidelity"]
        return {"auc": classification["synthetic"]["mean"],
                "auc_per_seed": classification["synthetic"]["per_seed"],
                "auc_ci": classification["synthetic"]["ci95"],
                "auc_real": classification["real"]["mean"], "gap_pp": classification["gap_pp"],
                "gap_pp_ci": classification["gap_pp_ci95"], "fd": fidelity["fd"],
                "precision": fidelity["prdc"]["precision"], "recall": fidelity["prdc"]["recall"],
                "coverage": fidelity["prdc"]["coverage"],
                "retrieval": fidelity["retrieval"]["synthetic"],
                "retrieval_real_test": fidelity["retrieval"]["real_test"]}


class IndependentCopies:
    """Copies by exhaustive aligned-pixel matching: an image whose aligned-pixel distance to
    some training image (every training image, at every shift and mirror) is below the closest
    that any of the test split's real images comes.

    Independent of the filter's networks and of the split both the filter and the audit
    calibrate on (validation), not of the filter's pixel metric: it is that metric at a
    stricter cutoff, so what it calls a copy the filter's pixel floor rejects too, and what
    the metric cannot align (a crop, a rotation) it does not count either."""

    def __init__(self, run: Path) -> None:
        config = load_config(config_file=run / "config.yaml")
        dataset = load_canonical(RunDir(run).stage_path("prepare"))
        self.pixels = AlignedPixels.from_settings(config.privacy)
        self.index = self.pixels.index(dataset.subset("train").images_float())
        test_nearest, _ = self.pixels.nearest(self.index, dataset.subset("test").images_float())
        self.cutoff = float(test_nearest.min())

    def __call__(self, images: np.ndarray) -> dict[str, Any]:
        """The share and count of `images` that are copies, and their median distance."""
        nearest, _ = self.pixels.nearest(self.index, images)
        copies = nearest < self.cutoff
        return {"rate": float(np.mean(copies)), "copies": int(np.sum(copies)),
                "cutoff": self.cutoff, "median_distance": float(np.median(nearest))}
