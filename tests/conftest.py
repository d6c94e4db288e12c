"""Shared fixtures: run the CLI in-process, and write small datasets of every input format."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A whole pipeline in seconds: 10 phantom patients at 16 px, a 40k-parameter UNet. The split and
# the conditioning are stated, not the demo preset's, so tuning the demo leaves them as they are.
TINY = ("--set", "phantoms.n_patients=10", "--set", "data.resolution=16",
        "--set", "data.split_fractions=[0.8,0.1,0.1]",
        "--set", "diffusion.conditioning=class+pseudo", "--set", "diffusion.model_channels=8",
        "--set", "diffusion.channel_mult=[1,2]",
        "--set", "diffusion.num_blocks=1", "--set", "diffusion.attn_resolutions=[]",
        "--set", "diffusion.batch_size=4", "--set", "diffusion.warmup_steps=0",
        "--set", "diffusion.steps=6", "--set", "sampling.count=8", "--set", "sampling.steps=4")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., CliResult]:
    """Run `unpersonal ARGS...` as the console script would, returning exit code and output."""
    from unpersonal.cli import main

    def invoke(*args: str | Path) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["unpersonal", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return invoke


def assert_refused(result: CliResult, *parts: str) -> str:
    """One `error:` line holding every part, exit code 2: how a user's mistake is reported.
    Returns the line."""
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def random_images(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Distinct uint8 images (no two identical), so duplicate checks only fire when meant to."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size), dtype=np.uint8)


def write_flat_npz(path: Path, count: int = 24, size: int = 16, patients: Sequence[str] | None = None,
                   splits: Sequence[str] | None = None, **extra: np.ndarray) -> Path:
    """An .npz in the layout of the shared Kermany files: images, label, patient_id[, split]."""
    arrays: dict[str, np.ndarray] = {
        "images": random_images(count, size),
        "label": np.arange(count) % 2,
        "patient_id": np.array(list(patients) if patients is not None
                               else [f"P{i // 2:03d}" for i in range(count)]),
    }
    if splits is not None:
        arrays["split"] = np.array(list(splits))
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def write_image_folder(folder: Path, count: int = 12, size: int = 16, header: str | None = None,
                       rows: Sequence[str] | None = None, mode: str = "L") -> Path:
    """PNG files plus labels.csv (path, finding, patient_id); `rows`/`header` replace the CSV."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    images = random_images(count, size)
    lines = [header or "path,finding,patient_id"]
    for i, pixels in enumerate(images):
        image = Image.fromarray(pixels, mode="L")
        image.convert(mode).save(folder / "img" / f"{i:03d}.png")
        lines.append(f"img/{i:03d}.png,{i % 2},P{i // 2:02d}")
    if rows is not None:
        lines = [lines[0], *rows]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def shared_data() -> Path:
    """The real Kermany chest X-rays beside the project; tests needing them skip without them."""
    if not (SHARED_DATA / "kermany_cxr_64.npz").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (optional: tests on generated data "
                    "cover the same code)")
    return SHARED_DATA


# Models just good enough to make the filter's decisions meaningful on 24 phantom patients at
# 16 px: the re-ID network separates held-out patients (AUC near 1) in about 2 s. The split and
# the generate schedule are stated, not the demo preset's.
GENERATE_SETTINGS = (
    "--set", "phantoms.n_patients=24", "--set", "data.resolution=16",
    "--set", "data.split_fractions=[0.8,0.1,0.1]", "--set", "generate.attempts=3",
    "--set", "generate.guidance_floor=0",
    "--set", "embedder.width=4", "--set", "embedder.steps=10", "--set", "embedder.batch_size=16",
    "--set", "reid.width=8", "--set", "reid.steps=150", "--set", "reid.batch_size=16",
    "--set", "reid.validate_every=20", "--set", "reid.patience=20",
    "--set", "classifier.width=4", "--set", "classifier.epochs=2",
    "--set", "diffusion.conditioning=class+pseudo", "--set", "diffusion.model_channels=8",
    "--set", "diffusion.channel_mult=[1,2]", "--set", "diffusion.num_blocks=1",
    "--set", "diffusion.attn_resolutions=[]", "--set", "diffusion.batch_size=8",
    "--set", "diffusion.steps=60", "--set", "sampling.steps=4", "--set", "generate.block_size=8")
GENERATE_STAGES = ("prepare", "fit-embedder", "fit-reid", "calibrate", "fit-classifier",
                   "fit-diffusion", "generate")  # in `unpersonal run`'s order (test_stages.py)


def invoke_cli(*args: str | Path) -> None:
    """Run one command in-process and fail the test with its output if it fails."""
    from typer.testing import CliRunner

    from unpersonal.cli import app

    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, (args[0], result.output)


@pytest.fixture(scope="session")
def generated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom run through `generate` (about 15 s), shared by the tests that read it; tests
    that run stages again work on a copy."""
    import torch

    root = tmp_path_factory.mktemp("generate") / "run"
    # One thread, as in the subprocesses the generate tests compare it with (OMP_NUM_THREADS=1):
    # float32 sums over another number of threads round differently in the last bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage in GENERATE_STAGES:
            invoke_cli(stage, "--out", root, *GENERATE_SETTINGS)
    finally:
        torch.set_num_threads(threads)
    return root


def copy_run_without(run: Path, target: Path, stage: str = "generate") -> Path:
    """A copy of the run whose `stage` must run again."""
    import json
    import shutil

    shutil.copytree(run, target)
    shutil.rmtree(target / stage)
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["stages"][stage]
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


# The stages after generate, with models small enough for seconds, and every utility row of
# the report (the demo preset trains the verdict's classifier alone).
RELEASE_SETTINGS = (
    "--set", "audit.embedder_width=8", "--set", "audit.reid_width=12",
    "--set", "audit.planted=20", "--set", "evaluate.real_plus_synthetic=true",
    "--set", "evaluate.pretrain_finetune=true", "--set", "evaluate.restoration=true",
    "--set", "evaluate.classifier_seeds=2", "--set", "evaluate.kid_subsets=5",
    "--set", "evaluate.bootstrap=50", "--set", "evaluate.restoration_steps=5",
    "--set", "evaluate.restoration_width=8")


@pytest.fixture(scope="session")
def released_run(generated_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `generated_run` taken through audit, evaluate, report and export."""
    import shutil

    run = tmp_path_factory.mktemp("release") / "run"
    shutil.copytree(generated_run, run)
    for stage in ("audit", "evaluate", "report", "export"):
        invoke_cli(stage, "--out", run, *RELEASE_SETTINGS)
    return run
