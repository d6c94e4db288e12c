"""Restoration utility: PSNR and SSIM give the textbook answers, the degradations are seeded, a
briefly trained denoiser beats doing nothing, training is reproducible, and the real-vs-synthetic
comparison reports means with intervals and paired tests."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from unpersonal.evaluation.restoration import (PSNR_CAP_DB, DnCNN, SRNet, add_noise,
                                               compare_restoration, downsample_x2,
                                               evaluate_restorer, fit_restorer, make_restorer,
                                               psnr, sr_input, ssim)

SIZE = 16
SMALL_NET = dict(depth=4, width=16)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """16 px models gain nothing from a second thread on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Smooth random fields [N, size, size] in [0.1, 0.9]: structure a denoiser can learn."""
    field = gaussian_filter(np.random.default_rng(seed).normal(size=(n, size, size)), (0, 2, 2),
                            mode="wrap")
    low = field.min(axis=(1, 2), keepdims=True)
    span = np.ptp(field, axis=(1, 2), keepdims=True)
    return (0.1 + 0.8 * (field - low) / span).astype(np.float32)


def ssim_like_skimage(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False) re-done with scipy on one image: filter the whole image with a
    Gaussian truncated at 3.5 sigma (11 taps), then average the SSIM map 5 px in from the edges."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    blur = lambda image: gaussian_filter(image, sigma=1.5, truncate=3.5)  # noqa: E731
    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def ssim_brute_force(x: np.ndarray, y: np.ndarray, window: int) -> float:
    """SSIM by looping over every window position: the definition, with nothing shared."""
    offsets = np.arange(window) - (window - 1) / 2
    weights = np.outer(*2 * [np.exp(-offsets ** 2 / (2 * 1.5 ** 2))])
    weights /= weights.sum()
    values = []
    for i in range(x.shape[0] - window + 1):
        for j in range(x.shape[1] - window + 1):
            a, b = x[i:i + window, j:j + window], y[i:i + window, j:j + window]
            ma, mb = (weights * a).sum(), (weights * b).sum()
            va, vb = (weights * (a - ma) ** 2).sum(), (weights * (b - mb) ** 2).sum()
            cov = (weights * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)
                          / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
    return float(np.mean(values))


# ---------------------------------------------------------------- metrics


def test_psnr_known_answers_and_cap() -> None:
    clean = smooth_images(3, 0)
    shifted = clean + 0.1  # uniform error 0.1: MSE 0.01, PSNR 20 dB
    np.testing.assert_allclose(psnr(clean, shifted), 20.0, atol=1e-4)
    np.testing.assert_allclose(psnr(clean, shifted, data_range=2.0), 20 + 20 * np.log10(2),
                               atol=1e-4)
    same = psnr(clean, clean)  # identical images: capped, not inf
    assert np.all(np.isfinite(same)) and np.all(same == PSNR_CAP_DB)
    assert psnr(clean, shifted).shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        psnr(clean, clean[:, :8])


def test_ssim_of_an_image_with_itself_is_one_and_drops_with_noise() -> None:
    clean = smooth_images(4, 1, size=32)
    np.testing.assert_allclose(ssim(clean, clean), 1.0, atol=1e-12)
    scores = [ssim(clean, add_noise(clean, sigma, seed=3)).mean() for sigma in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2] > 0


@pytest.mark.parametrize("size", [16, 32])
def test_ssim_matches_the_skimage_recipe_and_the_definition(size: int) -> None:
    clean = smooth_images(3, 2, size=size)
    noisy = add_noise(clean, 0.15, seed=4)
    ours = ssim(clean, noisy)
    np.testing.assert_allclose(ours, [ssim_like_skimage(a, b) for a, b in zip(clean, noisy)],
                               atol=1e-9)
    np.testing.assert_allclose(ours[0], ssim_brute_force(clean[0], noisy[0], 11), atol=1e-9)


def test_ssim_agrees_with_skimage() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    clean = smooth_images(3, 5, size=32)
    noisy = add_noise(clean, 0.1, seed=6)
    theirs = [metrics.structural_similarity(a.astype(np.float64), b.astype(np.float64),
                                            gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=1.0)
              for a, b in zip(clean, noisy)]
    np.testing.assert_allclose(ssim(clean, noisy), theirs, atol=1e-4)


def test_ssim_window_shrinks_to_fit_small_images() -> None:
    clean = smooth_images(2, 7, size=8)  # 8 px: the window becomes 7x7
    noisy = add_noise(clean, 0.1, seed=8)
    np.testing.assert_allclose(ssim(clean, clean), 1.0, atol=1e-12)
    np.testing.assert_allclose(ssim(clean, noisy)[1], ssim_brute_force(clean[1], noisy[1], 7),
                               atol=1e-9)


# ---------------------------------------------------------------- degradations and networks


def test_degradations_are_seeded_and_correct() -> None:
    clean = smooth_images(8, 9)
    noisy = add_noise(clean, 0.05, seed=1)
    assert np.array_equal(noisy, add_noise(clean, 0.05, seed=1))
    assert not np.array_equal(noisy, add_noise(clean, 0.05, seed=2))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert abs(float((noisy - clean).std()) - 0.05) < 0.005  # images stay well inside [0, 1]
    block = np.array([[[0.0, 0.2, 1.0, 1.0], [0.4, 0.6, 1.0, 1.0]]])
    np.testing.assert_allclose(downsample_x2(block), [[[0.3, 1.0]]], atol=1e-7)
    up = sr_input(clean)
    assert up.shape == clean.shape and up.min() >= 0 and up.max() <= 1
    assert 25 < psnr(clean, up).mean() < PSNR_CAP_DB  # close to, but not, the original
    with pytest.raises(ValueError, match="even"):
        sr_input(clean[:, :15, :15])


def test_untrained_restorers_return_their_input() -> None:
    """The last layer starts at zero, so training starts from the do-nothing baseline."""
    assert isinstance(make_restorer("denoise"), DnCNN) and isinstance(make_restorer("sr"), SRNet)
    images = torch.from_numpy(smooth_images(2, 3)).unsqueeze(1)
    for task in ("denoise", "sr"):
        assert torch.equal(make_restorer(task, **SMALL_NET)(images), images)
    with pytest.raises(ValueError, match="task"):
        make_restorer("deblur")


def test_a_briefly_trained_denoiser_beats_the_noisy_input() -> None:
    net = fit_restorer("denoise", smooth_images(64, 10), steps=150, batch_size=16, lr=2e-3,
                       seed=0, noise_sigma=0.1, **SMALL_NET)
    scores = evaluate_restorer(net, "denoise", smooth_images(16, 11), noise_sigma=0.1, seed=5)
    assert set(scores) >= {"psnr", "ssim", "baseline_psnr", "baseline_ssim"}
    assert all(scores[key].shape == (16,) for key in ("psnr", "ssim", "baseline_psnr"))
    assert scores["psnr"].mean() > scores["baseline_psnr"].mean() + 3  # measured: ~28 vs ~20 dB
    assert scores["ssim"].mean() > scores["baseline_ssim"].mean()
    assert np.mean(scores["psnr"] > scores["baseline_psnr"]) == 1.0
    clean = torch.from_numpy(smooth_images(4, 11)).unsqueeze(1)
    noisy = torch.from_numpy(add_noise(clean.squeeze(1).numpy(), 0.1, seed=6)).unsqueeze(1)
    predicted, noise = net.residual(noisy).flatten(), (noisy - clean).flatten()
    assert torch.corrcoef(torch.stack([predicted, noise]))[0, 1] > 0.5  # DnCNN predicts the noise


def test_super_resolution_trains_and_beats_bicubic() -> None:
    net = fit_restorer("sr", smooth_images(64, 12), steps=150, batch_size=16, lr=2e-3, seed=0,
                       **SMALL_NET)
    scores = evaluate_restorer(net, "sr", smooth_images(16, 13), noise_sigma=0.1, seed=5)
    assert scores["psnr"].mean() > scores["baseline_psnr"].mean()  # measured: ~39 vs ~35 dB


def test_seeded_training_is_reproducible() -> None:
    images = smooth_images(16, 14)

    def weights(seed: int, caller_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(caller_seed)  # the caller's RNG state must not matter...
        before = torch.random.get_rng_state()
        net = fit_restorer("denoise", images, steps=5, batch_size=4, lr=1e-3, seed=seed,
                           depth=3, width=8)
        assert torch.equal(torch.random.get_rng_state(), before)  # ...nor be touched
        return [value.clone() for value in net.state_dict().values()]

    first, again, other = weights(3, caller_seed=10), weights(3, caller_seed=11), weights(4, 10)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


# ---------------------------------------------------------------- the comparison


def compare(real: np.ndarray, synthetic: np.ndarray) -> dict:
    return compare_restoration(real, synthetic, smooth_images(12, 15), "denoise", steps=20,
                               batch_size=8, lr=2e-3, seed=1, noise_sigma=0.1, depth=3, width=8,
                               resamples=200, test_patients=np.arange(12) // 2,
                               margins={"psnr": 0.5, "ssim": 0.01})


def test_compare_restoration_reports_means_intervals_and_paired_tests() -> None:
    result = compare(smooth_images(32, 16), smooth_images(32, 17))
    assert json.loads(json.dumps(result)) == result  # plain JSON-able figures
    assert {"task", "test_images", "settings", "real", "synthetic", "baseline",
            "difference"} <= set(result)
    assert result["test_images"] == 12
    for group in ("real", "synthetic", "baseline", "difference"):
        for metric in ("psnr", "ssim"):
            figure = result[group][metric]
            low, high = figure["ci95"]
            assert low <= figure["mean"] <= high, (group, metric, figure)
            assert low < high
    for metric in ("psnr", "ssim"):
        difference = result["difference"][metric]
        assert 0 < difference["equivalence"]["p"] <= 1
        expected = result["synthetic"][metric]["mean"] - result["real"][metric]["mean"]
        assert difference["mean"] == pytest.approx(expected, abs=1e-12)
    assert result["real"]["psnr"]["mean"] > result["baseline"]["psnr"]["mean"]


def test_identical_training_sets_give_no_difference() -> None:
    images = smooth_images(32, 18)
    result = compare(images, images.copy())
    for metric in ("psnr", "ssim"):
        difference = result["difference"][metric]
        assert difference["mean"] == 0.0 and difference["ci95"] == [0.0, 0.0]
        assert difference["equivalence"]["equivalent"]
        assert difference["equivalence"]["interval"] == [0.0, 0.0]
        assert result["real"][metric] == result["synthetic"][metric]
