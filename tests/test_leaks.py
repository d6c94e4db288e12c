"""The leak kit: every kind makes what it says, from the rows it says, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from unpersonal.privacy.leaks import (IDENTITY_PROBE, SINGLE_IMAGE, TRANSFORMS, leak_count,
                                      leak_kinds, leaked_release, make_leaks)
from unpersonal.sampling.solvers import sample


@pytest.fixture(scope="module")
def train() -> tuple[np.ndarray, np.ndarray]:
    """40 smooth random images of 16 px; patients 0..9 have 3 images each, 10..19 one."""
    rng = np.random.default_rng(0)
    images = np.stack([ndimage.gaussian_filter(rng.random((16, 16)), 2) for _ in range(40)])
    images = (images - images.min()) / (images.max() - images.min())
    patients = np.r_[np.repeat(np.arange(10), 3), np.arange(10, 20)]
    return images.astype(np.float32), patients


def standardised(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", [*TRANSFORMS, SINGLE_IMAGE])
def test_each_kind_leaks_distinct_training_images(kind: str, train: tuple) -> None:
    images, patients = train
    leaks = make_leaks(kind, images, patients, 8, seed=1)
    assert leaks.images.shape == (8, 16, 16) and leaks.images.dtype == np.float32
    assert 0 <= leaks.images.min() and leaks.images.max() <= 1
    assert len(set(leaks.rows)) == 8
    source = images[leaks.rows]
    if kind in ("copy", SINGLE_IMAGE):
        np.testing.assert_array_equal(leaks.images, source)
    else:
        assert not np.allclose(leaks.images, source, atol=1e-4), kind
        if kind in ("noise", "contrast", "brightness", "blur", "gamma", "resample"):
            # Still the same picture in the same place: correlates best with its own source.
            correlation = standardised(leaks.images) @ standardised(images).T
            assert (correlation.argmax(axis=1) == leaks.rows).all(), kind
    again = make_leaks(kind, images, patients, 8, seed=1)
    np.testing.assert_array_equal(leaks.images, again.images)


def test_flip_mirrors_left_to_right(train: tuple) -> None:
    images, patients = train
    leaks = make_leaks("flip", images, patients, 3, seed=0)
    np.testing.assert_array_equal(leaks.images, images[leaks.rows][:, :, ::-1])


def test_single_image_leaks_come_from_patients_with_one_image(train: tuple) -> None:
    images, patients = train
    leaks = make_leaks(SINGLE_IMAGE, images, patients, 10, seed=2)
    counts = np.bincount(patients)
    assert (counts[patients[leaks.rows]] == 1).all()
    with pytest.raises(ValueError, match="only 10"):
        make_leaks(SINGLE_IMAGE, images, patients, 11, seed=2)
    with pytest.raises(ValueError, match="one patient id per image"):
        make_leaks("copy", images, patients[:-1], 2, seed=2)


def test_model_leaks_need_the_model_and_a_valid_sigma(train: tuple) -> None:
    images, patients = train
    with pytest.raises(ValueError, match="need the diffusion model"):
        make_leaks("model-0.5", images, patients, 2, seed=0)
    with pytest.raises(ValueError, match="model-<sigma>"):
        make_leaks("model-x", images, patients, 2, seed=0, renoise=lambda *a: a[1])
    with pytest.raises(ValueError, match="unknown leak kind"):
        make_leaks("mirror", images, patients, 2, seed=0)
    seen = {}

    def renoise(rows, batch, sigma, seeds):
        seen.update(rows=rows, sigma=sigma, seeds=seeds)
        return batch
    leaks = make_leaks("model-0.2", images, patients, 4, seed=0, renoise=renoise)
    assert seen["sigma"] == 0.2 and list(seen["rows"]) == list(leaks.rows)
    assert len(set(seen["seeds"])) == 4
    assert "model-0.5" in leak_kinds() and "flip" in leak_kinds()


def test_sampling_from_a_start_image_at_low_noise_returns_it() -> None:
    """SDEdit's start, with the ideal denoiser of Gaussian data (whose ODE only rescales): from
    an image noised to a small sigma, sampling returns that image up to the noise added; from
    pure noise, an unrelated one."""
    class Gaussian(torch.nn.Module):
        def forward(self, x, sigma, cond):
            return x * 0.25 / (sigma[:, None, None, None] ** 2 + 0.25)

    start = torch.rand(4, 1, 8, 8) * 2 - 1
    near = sample(Gaussian(), None, [1, 2, 3, 4], num_steps=8, image_shape=(1, 8, 8),
                  sigma_max=0.05, start=start).images
    far = sample(Gaussian(), None, [1, 2, 3, 4], num_steps=8, image_shape=(1, 8, 8)).images

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    assert (near - start).abs().mean() < 0.06 and correlation(near, start) > 0.95
    assert abs(correlation(far, start)) < 0.3
    with pytest.raises(ValueError, match="start must be"):
        sample(Gaussian(), None, [1], num_steps=2, image_shape=(1, 8, 8), start=start)


def test_leaked_release_replaces_the_share_asked_for() -> None:
    release = np.zeros((200, 4, 4), np.float32)
    assert leak_count(200, 0.01) == 2 and leak_count(200, 0.001) == 1
    leaks = np.ones((leak_count(200, 0.05), 4, 4), np.float32)
    out, leaked = leaked_release(release, leaks, seed=3)
    assert leaked.sum() == 10 and (out[leaked] == 1).all() and (out[~leaked] == 0).all()
    assert (release == 0).all()  # the clean release is left as it was
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        leak_count(200, 0.0)


def test_identity_probe_leaks_are_the_runs_probes(train: tuple) -> None:
    images, patients = train
    probes = images[:6] * 0.5
    leaks = make_leaks(IDENTITY_PROBE, images, patients, 4, seed=0, probes=probes)
    np.testing.assert_array_equal(leaks.images, probes[leaks.rows])
    assert len(set(leaks.rows)) == 4
    with pytest.raises(ValueError, match="has 0 identity probes"):
        make_leaks(IDENTITY_PROBE, images, patients, 1, seed=0)
    assert IDENTITY_PROBE in leak_kinds()


def test_a_smaller_dose_from_the_front_is_drawn_from_every_row(train: tuple) -> None:
    """The benchmarks take a dose's leaks from the front: were the rows sorted, the smallest
    doses would hold only the lowest rows (on Kermany, one class)."""
    images, patients = train
    leaks = make_leaks("copy", images, patients, 30, seed=0)
    front = leaks.rows[:6]
    assert front.max() > np.sort(leaks.rows)[5]
    probes = make_leaks(IDENTITY_PROBE, images, patients, 20, seed=0, probes=images[:30])
    assert probes.rows[:5].max() > np.sort(probes.rows)[4]
