"""`fit-diffusion`: the loop trains, publishes, resumes exactly, and splits work across processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unpersonal.artifacts.denoiser import load_denoiser
from unpersonal.config import load_config
from unpersonal.torch_utils import batch_indices
from unpersonal.training import diffusion
from unpersonal.training.views import shift_and_jitter
from tests.conftest import TINY


def _steps(count: int, every: int = 2) -> tuple[str, ...]:
    return ("--set", f"diffusion.steps={count}", "--set", f"diffusion.checkpoint_every={every}")


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "fit-diffusion" / "training_log.csv") as handle:
        return list(csv.DictReader(handle))


def test_fit_diffusion_publishes_a_loadable_model(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cli("fit-diffusion", "--out", run, *TINY, *_steps(20))
    assert result.code == 2 and "no finished 'prepare' stage" in result.stderr
    assert cli("prepare", "--out", run, *TINY).code == 0
    result = cli("fit-diffusion", "--out", run, *TINY, *_steps(20))
    assert result.code == 0, result.stderr
    folder = run / "fit-diffusion"
    assert {p.name for p in folder.iterdir()} == {"ema.safetensors", "guide.safetensors",
                                                 "model.json", "pseudo_features.npy",
                                                 "training_log.csv"}
    meta = json.loads((folder / "model.json").read_text())
    assert meta["steps_done"] == 20 and meta["conditioner"]["mode"] == "class+pseudo"
    assert [int(row["step"]) for row in _log(run)] == [10, 20]
    assert not (run / ".work").exists()  # resumable state is dropped once published
    denoiser, _ = load_denoiser(folder)
    x = torch.randn(2, 1, 16, 16)
    cond = torch.zeros(2, denoiser.cond_dim)
    assert denoiser(x, torch.full((2,), 1.0), cond).shape == (2, 1, 16, 16)
    assert "up to date" in cli("fit-diffusion", "--out", run).stderr


def _ema_bytes(run: Path) -> bytes:
    return (run / "fit-diffusion" / "ema.safetensors").read_bytes()


def test_ctrl_c_saves_and_rerun_resumes_to_the_same_weights(cli, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        assert cli("prepare", "--out", run, *TINY).code == 0
    assert cli("fit-diffusion", "--out", straight, *TINY, *_steps(6, every=100)).code == 0

    calls = {"n": 0}
    original = diffusion.shift_and_jitter

    def interrupt_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(diffusion, "shift_and_jitter", interrupt_at_step_4)
    stopped = cli("fit-diffusion", "--out", resumed, *TINY, *_steps(6, every=100))
    assert stopped.code == 130 and "interrupted at step 3 of 6" in stopped.stderr
    assert (resumed / ".work" / "fit-diffusion" / "checkpoint.pt").is_file()
    assert not (resumed / "fit-diffusion").exists()
    monkeypatch.setattr(diffusion, "shift_and_jitter", original)
    again = cli("fit-diffusion", "--out", resumed, *TINY, *_steps(6, every=100))
    assert again.code == 0 and "resuming at step 3" in again.stderr
    assert _ema_bytes(resumed) == _ema_bytes(straight)
    untimed = [[(row["step"], row["loss"], row["lr"]) for row in _log(run)]
               for run in (straight, resumed)]
    assert untimed[0] == untimed[1]  # the 3 losses before the interruption count in its row


def test_changed_config_does_not_resume_stale_state(cli, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *TINY).code == 0
    monkeypatch.setattr(diffusion, "shift_and_jitter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli("fit-diffusion", "--out", run, *TINY, *_steps(6)).code == 130
    monkeypatch.undo()
    result = cli("fit-diffusion", "--out", run, *TINY, *_steps(6), "--set", "diffusion.lr=0.005")
    assert result.code == 0 and "resuming" not in result.stderr


def _unpersonal(*args: str | Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "unpersonal", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_mid_training_then_rerun_finishes_with_a_continuous_log(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *TINY).code == 0
    args = ("fit-diffusion", "--out", run, *TINY, *_steps(60, every=10))
    process = _unpersonal(*args)
    checkpoint = run / ".work" / "fit-diffusion" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = torch.load(checkpoint, weights_only=True)["step"]
    assert 10 <= saved_step < 60
    finish = _unpersonal(*args)
    out, err = finish.communicate(timeout=300)
    assert finish.returncode == 0, err
    assert f"resuming at step {saved_step}" in err
    steps = [int(row["step"]) for row in _log(run)]
    assert steps == list(range(10, 61, 10))  # no gap, no repeat across the kill
    assert json.loads((run / "fit-diffusion" / "model.json").read_text())["steps_done"] == 60


def test_two_processes_split_each_batch_and_train(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *TINY).code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + os.getpid() % 1000), "-m", "unpersonal", "fit-diffusion", "--out", str(run),
         *TINY, *_steps(6, every=100)], env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    meta = json.loads((run / "fit-diffusion" / "model.json").read_text())
    assert meta["processes"] == 2 and meta["steps_done"] == 6


def test_batch_indices_cover_each_image_once_per_epoch_and_split_by_rank() -> None:
    n, world, local = 10, 2, 3
    seen = [batch_indices(0, step, rank, local, world, n) for step in range(5) for rank in range(world)]
    flat = torch.cat(seen).numpy()
    assert sorted(flat[:n].tolist()) == list(range(n))  # first epoch: every image once
    assert sorted(flat[n:2 * n].tolist()) == list(range(n))
    assert not set(seen[0].tolist()) & set(seen[1].tolist())  # ranks take different images
    assert torch.equal(batch_indices(0, 3, 1, local, world, n), seen[7])  # a pure function


def test_augment_shifts_without_wrapping_and_never_flips_by_default() -> None:
    settings = load_config(None, None, []).diffusion
    assert not settings.augment_flip
    image = torch.linspace(-1, 1, 16).repeat(16, 1)[None, None].repeat(64, 1, 1, 1)  # dark->bright
    out = shift_and_jitter(image, settings.augment_shift, 0.0, torch.Generator().manual_seed(0),
                           (-1.0, 1.0), flip=settings.augment_flip)
    assert out.shape == image.shape
    assert (out[:, :, :, 0] <= -0.7).all() and (out[:, :, :, -1] >= 0.7).all()  # no wrap, no flip
    assert not torch.equal(out, image)
    flipped = shift_and_jitter(image, 0, 0.0, torch.Generator().manual_seed(0), (-1.0, 1.0),
                               flip=True)
    assert (flipped[:, 0, 0, 0] > 0).any() and (flipped[:, 0, 0, 0] < 0).any()


def test_intensity_jitter_stays_in_the_value_range() -> None:
    """Brightness moves by a share of the range: the classifier's [0, 1], diffusion's [-1, 1]."""
    generator = torch.Generator().manual_seed(0)
    for low, high in ((0.0, 1.0), (-1.0, 1.0)):
        image = torch.rand(32, 1, 16, 16, generator=generator) * (high - low) + low
        out = shift_and_jitter(image, 2, 0.4, generator, (low, high))
        assert out.min() >= low and out.max() <= high and not torch.equal(out, image)


def _sampled(run: Path) -> tuple[np.ndarray, dict]:
    with np.load(run / "sample" / "images.npz") as arrays:
        images = arrays["images"]
    return images, json.loads((run / "sample" / "sampling.json").read_text())


def test_sample_counts_nfe_honestly_and_ignores_batch_size(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *TINY).code == 0
    assert cli("fit-diffusion", "--out", run, *TINY, *_steps(4)).code == 0
    base = (*TINY, *_steps(4), "--set", "sampling.count=6", "--set", "sampling.steps=5")
    assert cli("sample", "--out", run, *base, "--set", "sampling.batch_size=6").code == 0
    whole, report = _sampled(run)
    assert whole.shape == (6, 16, 16) and whole.dtype == np.uint8
    assert report["nfe_per_image"] == 5 and (run / "sample" / "grid.png").is_file()
    assert cli("sample", "--out", run, *base, "--set", "sampling.batch_size=4").code == 0
    split, _ = _sampled(run)
    assert np.abs(whole.astype(int) - split.astype(int)).max() <= 1  # same seed, same image
    heun = cli("sample", "--out", run, *base, "--set", "sampling.solver=heun",
               "--set", "sampling.guidance=2")
    assert heun.code == 0 and _sampled(run)[1]["nfe_per_image"] == 2 * (2 * 5 - 1)
    guided = cli("sample", "--out", run, *base, "--set", "sampling.solver=dpmpp2m",
                 "--set", "sampling.guide=autoguidance",
                 "--set", "sampling.guidance=2")
    assert guided.code == 0 and _sampled(run)[1]["nfe_per_image"] == 2 * 5
    assert not np.array_equal(_sampled(run)[0], whole)  # the early-checkpoint guide acts


def test_sample_at_guidance_zero_against_the_labels_is_the_class_conditional_model(
        cli, tmp_path: Path) -> None:
    """A class+pseudo model sampled at w = 0 against the labels is told the labels alone (what
    `generate` draws its candidates from at the cpu preset): one pass per step, not the
    unconditional model that w = 0 against the empty condition gives."""
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *TINY).code == 0
    assert cli("fit-diffusion", "--out", run, *TINY, *_steps(4)).code == 0
    base = (*TINY, *_steps(4), "--set", "sampling.count=6", "--set", "sampling.steps=5",
            "--set", "sampling.guidance=0")
    assert cli("sample", "--out", run, *base).code == 0
    labels_only, report = _sampled(run)
    assert report["guidance_against"] == "labels" and report["nfe_per_image"] == 5
    assert cli("sample", "--out", run, *base, "--set", "sampling.guidance_against=empty").code == 0
    unconditional, report = _sampled(run)
    assert report["guidance_against"] == "empty" and report["nfe_per_image"] == 5
    assert not np.array_equal(labels_only, unconditional)


def test_messages_name_an_epoch_that_exists() -> None:
    from unpersonal.training.loop import TrainingLoop

    loop = TrainingLoop("fit-classifier", None, 110, checkpoint_every=10, max_minutes=None,
                        epoch_steps=11)
    said = []
    for step in (0, 11, 109, 110):
        loop.step = step
        said.append(loop._where())
    assert said == ["step 0 of 110 (epoch 1 of 10)", "step 11 of 110 (epoch 2 of 10)",
                    "step 109 of 110 (epoch 10 of 10)", "step 110 of 110 (epoch 10 of 10)"]
