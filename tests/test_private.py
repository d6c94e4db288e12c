"""Patient-level differential privacy of `fit-diffusion`: the accounting is Opacus's, a patient
is one unit however many images it has, one patient moves the step by at most the clip norm, and
the CLI states epsilon and refuses settings that would not be private."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unpersonal.artifacts.denoiser import build_denoiser, load_denoiser
from unpersonal.config import DiffusionConfig, DiffusionPrivacy
from unpersonal.errors import UserError
from unpersonal.models.conditioning import Conditioner
from unpersonal.models.edm import EDM2Loss
from unpersonal.sampling.generate import generator
from unpersonal.training import private
from tests.conftest import TINY, assert_refused, write_flat_npz


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_epsilon_is_what_opacus_counts_step_by_step(accountant: str) -> None:
    from opacus.accountants import create_accountant

    settings = DiffusionPrivacy(epsilon=4.0, accountant=accountant)
    plan = private.plan(settings, patients=3000, batch=64, steps=500)
    assert plan.delta == 1e-4 and plan.sample_rate == 64 / 3000
    stepwise = create_accountant(accountant)
    for _ in range(500):
        stepwise.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    expected = stepwise.get_epsilon(plan.delta)
    assert plan.epsilon_after(500) == pytest.approx(expected, rel=1e-3)
    assert 0.95 * 4.0 <= plan.epsilon_after(500) <= 4.0
    assert plan.epsilon_after(250) < plan.epsilon_after(500)  # stopped early: less spent


def test_the_default_delta_is_below_one_over_the_patients() -> None:
    assert private.default_delta(3000) == 1e-4
    assert private.default_delta(1000) == 1e-4  # 1e-3 would equal 1 / 1000
    assert private.default_delta(45) == 1e-2


def test_a_patient_with_many_images_is_sampled_as_one_unit() -> None:
    patient_of_row = np.array(["big"] * 40 + [f"p{i}" for i in range(99)])
    sampler = private.PatientSampler(patient_of_row, sample_rate=0.2, images_per_patient=2,
                                     secret=3)
    big_steps, small_steps = 0, 0
    for step in range(2000):
        rows = sampler.draw(step)
        assert rows.shape[1] == 2
        patients = patient_of_row[rows]
        assert (patients == patients[:, :1]).all()  # a row of the draw is one patient's images
        big_steps += int((patients[:, 0] == "big").sum())
        small_steps += int((patients[:, 0] != "big").sum())
    assert big_steps / 2000 == pytest.approx(0.2, abs=0.03)  # no more often for its 40 images
    assert small_steps / (2000 * 99) == pytest.approx(0.2, abs=0.01)
    halves = [private.PatientSampler(patient_of_row, 0.2, 2, secret=3, rank=r, world=2).draw(7)
              for r in (0, 1)]
    assert sorted(np.concatenate(halves).ravel()) == sorted(sampler.draw(7).ravel())


def _tiny_denoiser() -> tuple[torch.nn.Module, Conditioner]:
    torch.manual_seed(0)
    conditioner = Conditioner("class", 2, 0)
    settings = DiffusionConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1,
                               attn_resolutions=())
    return build_denoiser(settings, 8, conditioner).eval(), conditioner


def _patient_inputs(patients: int, rows: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    loss = EDM2Loss()
    images = torch.randn(patients, rows, 1, 8, 8, generator=generator)
    sigma = loss.sample_sigma(patients * rows, torch.device("cpu"), generator)
    noise = torch.randn(images.shape, generator=generator)
    cond = torch.nn.functional.one_hot(torch.randint(0, 2, (patients * rows,), generator=generator),
                                       2).float()
    return [images, sigma.reshape(patients, rows, 1, 1, 1), noise, cond.reshape(patients, rows, 2)]


def _loss_of_rows(denoiser, x, s, n, c):
    return EDM2Loss().given(denoiser, x, s, n, c)


def test_each_patient_gradient_is_that_patient_s_alone() -> None:
    net, _ = _tiny_denoiser()
    inputs = _patient_inputs(patients=3, rows=4)
    grads, losses = private.per_patient_gradients(net, _loss_of_rows, tuple(inputs))
    for patient in range(3):
        net.zero_grad()
        loss = _loss_of_rows(net, *(t[patient] for t in inputs)).mean()
        loss.backward()
        assert losses[patient].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, parameter in net.named_parameters():
            torch.testing.assert_close(grads[name][patient], parameter.grad, rtol=1e-4, atol=1e-6)


def test_one_patient_moves_the_summed_gradient_by_at_most_the_clip_norm() -> None:
    net, _ = _tiny_denoiser()
    inputs = _patient_inputs(patients=6, rows=3)
    inputs[0][5] *= 50  # one patient whose images pull hard
    grads, _ = private.per_patient_gradients(net, _loss_of_rows, tuple(inputs))
    with_all, norms = private.clip_and_sum(grads, max_norm=0.5)
    assert norms[5] > 0.5  # the clip bites
    without, _ = private.clip_and_sum({k: g[:5] for k, g in grads.items()}, max_norm=0.5)
    moved = torch.linalg.vector_norm(torch.cat([(with_all[k] - without[k]).ravel()
                                                for k in grads]))
    assert moved <= 0.5 + 1e-5
    unclipped = torch.linalg.vector_norm(torch.cat([grads[k][5].ravel() for k in grads]))
    assert unclipped > 10 * moved  # without clipping it would move the step far more


def test_a_layer_that_mixes_the_batch_is_refused_by_name() -> None:
    with pytest.raises(UserError, match="BatchNorm"):
        private.check_layers(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3),
                                                 torch.nn.BatchNorm2d(4)))
    private.check_layers(_tiny_denoiser()[0])


def _private(*settings: str) -> tuple[str, ...]:
    return (*TINY, "--set", "diffusion.steps=4", "--set", "diffusion.checkpoint_every=100",
            "--set", "diffusion.conditioning=class",
            *(item for setting in settings for item in ("--set", setting)))


PRIVATE = ("diffusion.privacy.epsilon=8", "diffusion.batch_size=3")


def _weights(run: Path) -> bytes:
    return (run / "fit-diffusion" / "ema.safetensors").read_bytes()


def test_private_training_states_its_epsilon_and_its_noise_is_secret(cli, tmp_path: Path) -> None:
    """The noise comes from a secret drawn per training, not from the config's seed: the same
    config and seed give other weights, which an adversary who knows the config cannot
    reproduce."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert cli("prepare", "--out", run, *TINY).code == 0
        result = cli("fit-diffusion", "--out", run, *_private(*PRIVATE))
        assert result.code == 0, result.stderr
    assert "patient-level differential privacy: epsilon" in result.stderr
    meta = json.loads((runs[0] / "fit-diffusion" / "model.json").read_text())
    privacy = meta["privacy"]
    assert privacy["unit"] == "patient" and 7.5 <= privacy["epsilon"] <= 8
    assert privacy["delta"] < 1 / privacy["patients"] and privacy["steps"] == 4
    assert privacy["delta_times_units"] == pytest.approx(privacy["delta"] * privacy["patients"],
                                                         abs=1e-4)
    assert privacy["accountant"].startswith("prv (Opacus")
    assert _weights(runs[0]) != _weights(runs[1])
    assert not (runs[0] / ".work").exists()  # the secret went with the checkpoint
    words = generator(meta)
    assert "differential privacy per patient" in words and f"{privacy['epsilon']:.2f}" in words


def test_a_resumed_private_training_repeats_an_uninterrupted_one(
        cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(private, "new_secret", lambda: 12345)  # both trainings draw one secret
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        assert cli("prepare", "--out", run, *TINY).code == 0
    assert cli("fit-diffusion", "--out", straight, *_private(*PRIVATE)).code == 0
    original = private.PatientSampler.draw

    def interrupt_at_step_2(self, step: int):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(private.PatientSampler, "draw", interrupt_at_step_2)
    assert cli("fit-diffusion", "--out", resumed, *_private(*PRIVATE)).code == 130
    monkeypatch.setattr(private.PatientSampler, "draw", original)
    monkeypatch.setattr(private, "new_secret", lambda: 999)  # resuming must keep the saved one
    again = cli("fit-diffusion", "--out", resumed, *_private(*PRIVATE))
    assert again.code == 0 and "resuming at step 2" in again.stderr
    assert _weights(resumed) == _weights(straight)


def test_the_noise_has_the_calibrated_scale() -> None:
    plan = private.PrivacyPlan(4.0, 1e-4, noise_multiplier=2.0, sample_rate=0.01,
                               expected_patients=100, patients=10_000, steps=10, max_grad_norm=0.5,
                               noise_levels=1, images_per_patient=1, accountant="rdp")
    summed = {"w": torch.zeros(200_000), "b": torch.full((3,), 7.0)}
    noisy = private.add_noise(summed, plan, secret=1, step=0)
    assert noisy["w"].std().item() == pytest.approx(2.0 * 0.5 / 100, rel=0.02)  # sigma C / B
    assert noisy["w"].mean().item() == pytest.approx(0.0, abs=1e-4)
    again = private.add_noise(summed, plan, secret=1, step=0)
    other = private.add_noise(summed, plan, secret=2, step=0)
    assert torch.equal(noisy["w"], again["w"]) and not torch.equal(noisy["w"], other["w"])


@pytest.mark.parametrize(("setting", "named"), [
    ("diffusion.privacy.epsilon=0", "diffusion.privacy.epsilon"),
    ("diffusion.privacy.delta=0.5", "diffusion.privacy.delta 0.5"),
    ("diffusion.batch_size=50", "diffusion.batch_size 50"),
    ("diffusion.conditioning=class+pseudo", "diffusion.conditioning: class or uncond"),
    ("diffusion.dropout=0.1", "diffusion.dropout: 0"),
])
def test_settings_that_would_not_be_private_are_refused(cli, tmp_path: Path, setting: str,
                                                        named: str) -> None:
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *TINY).code == 0
    extra = [] if "epsilon" in setting else ["diffusion.privacy.epsilon=4"]
    assert_refused(cli("fit-diffusion", "--out", run, *_private(*extra, setting)), named)
    assert not (run / "fit-diffusion").exists()


def test_latent_space_is_refused_under_privacy() -> None:
    with pytest.raises(ValueError, match="diffusion.privacy needs diffusion.space: pixel"):
        DiffusionConfig(space="latent", privacy=DiffusionPrivacy(epsilon=1.0))


def test_init_starts_from_another_run_s_denoiser(cli, tmp_path: Path) -> None:
    public, private_run = tmp_path / "public", tmp_path / "private"
    data = write_flat_npz(tmp_path / "public.npz", count=40,
                          patients=[f"public-{i // 2}" for i in range(40)])
    assert cli("prepare", "--out", public, "--data", data, *TINY).code == 0
    assert cli("prepare", "--out", private_run, *TINY).code == 0
    assert cli("fit-diffusion", "--out", public, *_private("diffusion.steps=20")).code == 0
    result = cli("fit-diffusion", "--out", private_run, "--init", public,
                 *_private(*PRIVATE, "diffusion.lr=1e-9",
                           "diffusion.privacy.max_grad_norm=1e-6"))
    assert result.code == 0, result.stderr
    assert "started from a denoiser trained on 40 images from public.npz" in result.stderr
    meta = json.loads((private_run / "fit-diffusion" / "model.json").read_text())
    assert meta["init"]["tensors_fresh"] == [] and meta["init"]["patients_checked"]
    x, sigma = torch.randn(2, 1, 16, 16), torch.full((2,), 1.0)
    (started, _), (source, _) = (load_denoiser(run / "fit-diffusion")
                                 for run in (private_run, public))
    cond = torch.zeros(2, started.cond_dim)
    torch.testing.assert_close(started(x, sigma, cond), source(x, sigma, cond), atol=1e-3,
                               rtol=1e-3)  # a near-zero step from the public weights
    wider = cli("fit-diffusion", "--out", private_run, "--init", public, "--force",
                *_private("diffusion.model_channels=16"))
    assert_refused(wider, "diffusion.init", "is not this run's")


def test_init_from_weights_that_saw_these_patients_is_refused_under_privacy(
        cli, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for run in (first, second):
        assert cli("prepare", "--out", run, *TINY).code == 0
    assert cli("fit-diffusion", "--out", first, *_private()).code == 0
    refused = cli("fit-diffusion", "--out", second, "--init", first, *_private(*PRIVATE))
    assert_refused(refused, "diffusion.init", "of this run's training patients")
    assert cli("fit-diffusion", "--out", second, "--init", first, *_private()).code == 0


def test_two_processes_train_privately_in_step(cli, tmp_path: Path) -> None:
    """Two processes split each step's patients, sum their clipped gradients and add the same
    noise: training ends with the same weights in both (checked by the trainer itself)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *TINY).code == 0
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(30500 + os.getpid() % 1000), "-m", "unpersonal", "fit-diffusion", "--out", str(run),
         *_private("diffusion.privacy.epsilon=8", "diffusion.batch_size=4")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    meta = json.loads((run / "fit-diffusion" / "model.json").read_text())
    assert meta["processes"] == 2 and meta["privacy"]["steps"] == 4
