"""Latent diffusion: the autoencoder stage, and a denoiser that works on its latents while
everything downstream sees images at the data's resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import GENERATE_SETTINGS, assert_refused
from unpersonal.artifacts.autoencoder import load_codec
from unpersonal.artifacts.denoiser import load_denoiser_codec
from unpersonal.data.canonical import load_canonical
from unpersonal.training.autoencoder import to_model_range

AUTOENCODER = ("--set", "diffusion.space=latent", "--set", "autoencoder.width=4",
               "--set", "autoencoder.steps=200", "--set", "autoencoder.lr=5e-3",
               "--set", "autoencoder.batch_size=8", "--set", "autoencoder.checkpoint_every=50")
SETTINGS = (*GENERATE_SETTINGS, *AUTOENCODER)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare, fit-autoencoder and a latent fit-diffusion on 24 phantom patients at 16 px."""
    from tests.conftest import invoke_cli

    root = tmp_path_factory.mktemp("latent") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage in ("prepare", "fit-autoencoder", "fit-diffusion"):
            invoke_cli(stage, "--out", root, *SETTINGS)
    finally:
        torch.set_num_threads(threads)
    return root


def test_the_autoencoder_reconstructs_better_than_the_mean_image(latent_run: Path) -> None:
    meta = json.loads((latent_run / "fit-autoencoder" / "autoencoder.json").read_text())
    assert meta["latent_shape"] == [4, 4, 4]  # factor 4 at 16 px, 4 channels
    dataset = load_canonical(latent_run / "prepare")
    train, val = dataset.subset("train").images_float(), dataset.subset("val").images_float()
    mean_image_mse = ((val - train.mean(axis=0)) ** 2).reshape(len(val), -1).mean(axis=1)
    assert meta["reconstruction"]["val"]["psnr"] > (-10 * np.log10(mean_image_mse)).mean()
    assert 0 < meta["reconstruction"]["val"]["ssim"] <= 1


def test_latents_are_standardised_to_the_denoisers_sigma_data(latent_run: Path) -> None:
    codec = load_codec(latent_run / "fit-autoencoder", sigma_data=0.5)
    train = load_canonical(latent_run / "prepare").subset("train")
    latents = codec.encode(to_model_range(train, slice(None)))
    assert latents.shape == (len(train), 4, 4, 4)
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(latents.std(dim=(0, 2, 3)), torch.full((4,), 0.5), atol=1e-3)
    assert codec.decode(latents[:3]).shape == (3, 1, 16, 16)


def test_a_latent_denoiser_carries_its_decoder_and_samples_images(
        latent_run: Path, cli, tmp_path: Path) -> None:
    folder = latent_run / "fit-diffusion"
    meta = json.loads((folder / "model.json").read_text())
    assert meta["resolution"] == 16 and meta["latent"] == {"channels": 4, "resolution": 4,
                                                           "factor": 4}
    assert load_denoiser_codec(folder, meta) is not None
    run = Path(shutil.copytree(latent_run, tmp_path / "run"))
    shutil.rmtree(run / "fit-autoencoder")  # sampling needs the denoiser's folder alone
    result = cli("sample", "--out", run, *SETTINGS, "--set", "sampling.count=6")
    assert result.code == 0, result.stderr
    with np.load(run / "sample" / "images.npz") as drawn:
        images = drawn["images"]
    assert images.shape == (6, 16, 16) and images.dtype == np.uint8
    assert images.std() > 0  # decoded images, not a constant


def test_latent_training_needs_the_autoencoder_first(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *SETTINGS).code == 0
    assert_refused(cli("fit-diffusion", "--out", run, *SETTINGS), "fit-autoencoder")
    assert not (run / "fit-diffusion").exists()


def test_a_factor_that_does_not_divide_the_resolution_is_refused(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = (*SETTINGS, "--set", "data.resolution=20", "--set", "autoencoder.factor=8")
    assert cli("prepare", "--out", run, *settings).code == 0
    assert_refused(cli("fit-autoencoder", "--out", run, *settings), "autoencoder.factor 8",
                   "20")
    assert not (run / "fit-autoencoder").exists()


def test_ctrl_c_saves_the_autoencoder_and_rerun_resumes_to_the_same_weights(
        cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unpersonal.training import autoencoder

    settings = (*SETTINGS, "--set", "autoencoder.steps=6", "--set",
                "autoencoder.checkpoint_every=100")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        assert cli("prepare", "--out", run, *settings).code == 0
    assert cli("fit-autoencoder", "--out", straight, *settings).code == 0
    calls, original = {"n": 0}, autoencoder.kl_divergence

    def interrupt_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(autoencoder, "kl_divergence", interrupt_at_step_4)
    stopped = cli("fit-autoencoder", "--out", resumed, *settings)
    assert stopped.code == 130 and "interrupted at step 3 of 6" in stopped.stderr
    assert not (resumed / "fit-autoencoder").exists()
    monkeypatch.setattr(autoencoder, "kl_divergence", original)
    again = cli("fit-autoencoder", "--out", resumed, *settings)
    assert again.code == 0 and "resuming at step 3" in again.stderr
    weights = [(run / "fit-autoencoder" / "autoencoder.safetensors").read_bytes()
               for run in (straight, resumed)]
    assert weights[0] == weights[1]
