"""Restoration utility: does a synthetic set train image-restoration networks as well as real data?

A classifier tests whether the synthetic images carry the labels; a restorer tests whether they
carry the pixel statistics (texture, edges, noise-free structure) that denoising and
super-resolution learn from. The experiment: train one small residual network on the real
training images and one on the synthetic ones, with the same seed and budget, then restore the
same degraded real test images with both and compare PSNR and SSIM image by image.

Two tasks:
    "denoise"  Gaussian noise of std `noise_sigma`, clipped to [0, 1]; DnCNN-style network that
               predicts the noise and subtracts it.
    "sr"       x2 super-resolution: 2x2 average pooling, then bicubic upsampling back to full size
               (the network's input); VDSR-style network that predicts the missing detail.

Every random draw is seeded: the initial weights from `seed`, the batch and the degradation of
training step t from (seed, t) as in the trainers (`unpersonal.torch_utils`), and the test
degradation from `seed`; so the same inputs and seed give the same figures (on the CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unpersonal.metrics.bootstrap import equivalence, mean_interval, resample_weights
from unpersonal.progress import LiveBar
from unpersonal.torch_utils import batch_indices, pick_device, step_generator

TASKS = ("denoise", "sr")
PSNR_CAP_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
EVAL_BATCH = 256


# ---------------------------------------------------------------- metrics


def psnr(reference: np.ndarray, restored: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image, images float [N, H, W] -> [N] (float64).

    A perfect restoration has infinite PSNR; it is capped at PSNR_CAP_DB (100 dB, an RMS error of
    1e-5 of the range) so that means, bootstrap intervals and paired differences stay finite and
    JSON-able. No real restoration comes near the cap.
    """
    reference, restored = _pair(reference, restored)
    mse = np.mean((reference - restored) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        values = 10 * np.log10(data_range ** 2 / mse)
    return np.minimum(values, PSNR_CAP_DB)


def ssim(reference: np.ndarray, restored: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity per image (Wang et al. 2004), images float [N, H, W] -> [N] (float64).

    The standard recipe, as skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)`: local means, variances and covariance
    under an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, and the mean of the SSIM
    map over the positions where the window lies wholly inside the image ('valid'). An 11 px
    window fits images of 11 px and more (32 px leaves a 22x22 map). For smaller images the window
    shrinks to the largest odd size that fits, sigma unchanged and the Gaussian renormalised;
    skimage refuses such images, so there the figure is this module's own.
    """
    reference, restored = _pair(reference, restored)
    window = _ssim_window(min(reference.shape[1:]))
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    x = torch.from_numpy(reference).unsqueeze(1)
    y = torch.from_numpy(restored).unsqueeze(1)
    mean_x, mean_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mean_x ** 2
    var_y = F.conv2d(y * y, window) - mean_y ** 2
    cov = F.conv2d(x * y, window) - mean_x * mean_y
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)
                / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2)))
    return ssim_map.mean(dim=(1, 2, 3)).numpy()


def _ssim_window(size: int) -> Tensor:
    """The normalised 2-D Gaussian window [1, 1, k, k] (float64): k = 11, or less to fit `size`."""
    k = min(SSIM_WINDOW, size)
    k -= 1 - k % 2
    offsets = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    line = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    line /= line.sum()
    return (line[:, None] * line[None, :]).view(1, 1, k, k)


def _pair(reference: np.ndarray, restored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both stacks as float64 [N, H, W] of one shape; a ValueError says what is wrong."""
    reference = _stack(reference, "reference")
    restored = _stack(restored, "restored")
    if reference.shape != restored.shape:
        raise ValueError(f"reference {list(reference.shape)} and restored "
                         f"{list(restored.shape)} differ in shape")
    return reference, restored


def _stack(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3 or min(images.shape) < 1:
        raise ValueError(f"{name} images must be a non-empty [N, H, W] stack, "
                         f"got shape {list(images.shape)}")
    return images


# ---------------------------------------------------------------- degradations


def add_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Images plus Gaussian noise of std `sigma`, clipped to [0, 1] (float32, same shape).

    Drawn on the CPU from a generator seeded by `seed` alone, so the noisy test set is the same
    whichever device the networks run on.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return _noisy(_tensor(images), sigma, generator).numpy()


def downsample_x2(images: np.ndarray) -> np.ndarray:
    """[N, H, W] -> [N, H/2, W/2] by 2x2 average pooling (float32); H and W must be even."""
    return _downsample(_tensor(images, even=True)).numpy()


def sr_input(images: np.ndarray) -> np.ndarray:
    """What the super-resolution network sees: the images downsampled x2 and upsampled back."""
    return _upsample(_downsample(_tensor(images, even=True))).numpy()


def _noisy(images: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return (images + sigma * noise).clamp(0, 1)


def _downsample(images: Tensor) -> Tensor:
    return F.avg_pool2d(images.unsqueeze(1), 2).squeeze(1)


def _upsample(images: Tensor) -> Tensor:
    """Bicubic (the usual SR baseline); its overshoot at edges is clipped back into [0, 1]."""
    up = F.interpolate(images.unsqueeze(1), scale_factor=2, mode="bicubic", align_corners=False)
    return up.squeeze(1).clamp(0, 1)


def _degrade(task: str, clean: Tensor, noise_sigma: float, generator: torch.Generator) -> Tensor:
    """The network input for `task` made from clean images [B, H, W]."""
    if task == "denoise":
        return _noisy(clean, noise_sigma, generator)
    return _upsample(_downsample(clean))


def _tensor(images: np.ndarray, even: bool = False) -> Tensor:
    """A checked float32 [N, H, W] tensor of images in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 3 or min(images.shape) < 1:
        raise ValueError(f"images must be a non-empty [N, H, W] stack, got shape "
                         f"{list(images.shape)}")
    if even and (images.shape[1] % 2 or images.shape[2] % 2):
        raise ValueError(f"x2 downsampling needs even height and width, got "
                         f"{list(images.shape[1:])}")
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("images must be finite and in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


# ---------------------------------------------------------------- networks


class ResidualRestorer(nn.Module):
    """A plain stack of 3x3 convolutions that predicts a residual added to its input.

    `depth` convolutions in all: 1 -> width, (depth - 2) x width -> width, each followed by a
    ReLU, then width -> 1. No BatchNorm: with small batches of small images its statistics are
    noisy, and at this depth the nets train fine without it. The last convolution starts at zero,
    so an untrained network returns its input: training starts from the do-nothing baseline and
    a short budget can only move away from it by lowering the loss.
    Input and output are images [B, 1, H, W] in [0, 1]; the output is not clipped (the loss sees
    it as is; evaluation clips).
    """

    sign = 1.0

    def __init__(self, depth: int = 6, width: int = 32) -> None:
        super().__init__()
        if depth < 2 or width < 1:
            raise ValueError(f"need depth >= 2 and width >= 1, got depth={depth}, width={width}")
        self.depth, self.width = depth, width
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.layers = nn.Sequential(*layers)

    def residual(self, images: Tensor) -> Tensor:
        """What the network predicts (zero-centred input, as the other project networks see)."""
        return self.layers(images * 2 - 1)

    def forward(self, images: Tensor) -> Tensor:
        return images + self.sign * self.residual(images)


class DnCNN(ResidualRestorer):
    """Residual denoiser (Zhang et al. 2017, minus BatchNorm): predicts the noise, subtracts it."""

    sign = -1.0


class SRNet(ResidualRestorer):
    """Residual x2 super-resolution on the bicubic-upsampled input (VDSR, Kim et al. 2016):
    predicts the detail the upsampling lost, adds it."""

    sign = 1.0


def make_restorer(task: str, depth: int = 6, width: int = 32) -> ResidualRestorer:
    _check_task(task)
    return (DnCNN if task == "denoise" else SRNet)(depth, width)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")


# ---------------------------------------------------------------- training and evaluation


def fit_restorer(task: str, train_images: np.ndarray, steps: int, batch_size: int, lr: float,
                 seed: int, noise_sigma: float = 0.1, progress: bool = False, *,
                 depth: int = 6, width: int = 32) -> ResidualRestorer:
    """Train a restorer for `task` on clean images float [N, H, W] in [0, 1]; returned in eval mode.

    Adam at a constant `lr` for `steps` steps of `batch_size` images, each degraded on the fly.
    The loss is the mean squared error to the clean image: PSNR, the headline figure, is a
    monotone function of it, and DnCNN and VDSR were both trained with it. The initial weights
    come from `seed` and the batch and degradation of step t from (seed, t), so the same inputs
    and seed give the same weights (on the CPU; GPU kernels may differ in the last bits).
    """
    _check_task(task)
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and lr > 0, got steps={steps}, "
                         f"batch_size={batch_size}, lr={lr}")
    clean = _tensor(train_images, even=task == "sr")
    device = pick_device()
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, caller's RNG left alone
        torch.manual_seed(seed)
        net = make_restorer(task, depth, width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    with LiveBar(f"training {task} restorer", steps, log_every=max(1, steps // 10),
                 enabled=progress) as bar:
        for step in range(steps):
            target = clean[batch_indices(seed, step, 0, batch_size, 1, len(clean))].to(device)
            degraded = _degrade(task, target, noise_sigma, step_generator(seed, step, device))
            loss = F.mse_loss(net(degraded.unsqueeze(1)), target.unsqueeze(1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1, loss=loss.item())
    return net.eval().requires_grad_(False)


@torch.no_grad()
def restore(net: nn.Module, degraded: np.ndarray) -> np.ndarray:
    """The network's output for degraded images [N, H, W], clipped to [0, 1] (float32)."""
    net.eval()
    device = next(net.parameters()).device
    images = _tensor(degraded)
    out = [net(images[start:start + EVAL_BATCH].unsqueeze(1).to(device)).clamp(0, 1).cpu()
           for start in range(0, len(images), EVAL_BATCH)]
    return torch.cat(out).squeeze(1).numpy()


def degraded_test_set(task: str, test_images: np.ndarray, noise_sigma: float, seed: int
                      ) -> np.ndarray:
    """The network input for every test image: noisy (seeded) or downsampled and upsampled."""
    _check_task(task)
    if task == "denoise":
        return add_noise(test_images, noise_sigma, seed)
    return sr_input(test_images)


def evaluate_restorer(net: nn.Module, task: str, test_images: np.ndarray, noise_sigma: float,
                      seed: int) -> dict[str, Any]:
    """Per-image PSNR and SSIM of the network's output and of doing nothing, on degraded tests.

    Returns {"task", "images", "psnr", "ssim", "baseline_psnr", "baseline_ssim"}, the last four
    float64 arrays [N]. The baseline is the network's own input (the noisy image, or the bicubic
    upsampling), so a report can show the network beats doing nothing.
    """
    clean = np.asarray(test_images, dtype=np.float64)
    degraded = degraded_test_set(task, clean, noise_sigma, seed)
    restored = restore(net, degraded)
    return {"task": task, "images": len(clean),
            "psnr": psnr(clean, restored), "ssim": ssim(clean, restored),
            "baseline_psnr": psnr(clean, degraded), "baseline_ssim": ssim(clean, degraded)}


def compare_restoration(real_train: np.ndarray, synthetic_train: np.ndarray,
                        test_images: np.ndarray, task: str, steps: int = 2000,
                        batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                        noise_sigma: float = 0.1, depth: int = 6, width: int = 32,
                        resamples: int = 1000, progress: bool = False,
                        test_patients: np.ndarray | None = None,
                        margins: dict[str, float] | None = None) -> dict[str, Any]:
    """Train a restorer on the real and on the synthetic set alike; restore the same real tests.

    Returns plain JSON-able figures:
        {"task", "test_images", "settings": {...},
         "real" | "synthetic" | "baseline": {"psnr": {"mean", "ci95": [low, high]}, "ssim": {...}},
         "difference": {"psnr": {"mean", "ci95", "equivalence"}, "ssim": {...}}}
    "baseline" is doing nothing (the degraded input). "difference" is synthetic - real per test
    image: its mean, a bootstrap interval and, with `margins` ({"psnr": dB, "ssim": ...},
    declared before the run), the two one-sided tests of equivalence within them
    (`metrics.bootstrap.equivalence`): the question "does synthetic data train as good a
    restorer?" is one of equivalence, not of significance. All intervals are percentile
    bootstraps over whole test patients (`test_patients`; each image its own patient when
    None), from the same `resamples` draws, so the intervals of one report are paired like the
    images.
    """
    _check_task(task)
    training = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    noise_sigma=noise_sigma, depth=depth, width=width)
    scores = {}
    for name, images in (("real", real_train), ("synthetic", synthetic_train)):
        net = fit_restorer(task, images, progress=progress, **training)
        scores[name] = evaluate_restorer(net, task, test_images, noise_sigma, seed)
    count = scores["real"]["images"]
    patients = np.arange(count) if test_patients is None else np.asarray(test_patients)
    if len(patients) != count:
        raise ValueError(f"test_patients has {len(patients)} entries for {count} test images")
    weights = resample_weights(patients, resamples, seed)
    summary: dict[str, Any] = {
        "task": task, "test_images": count, "test_patients": len(np.unique(patients)),
        "settings": {**training, "noise_sigma": noise_sigma if task == "denoise" else None,
                     "resamples": resamples, "resampling_unit": "patient", "loss": "mse",
                     "optimizer": "adam"}}
    for name in ("real", "synthetic"):
        summary[name] = {metric: mean_interval(scores[name][metric], weights)
                         for metric in ("psnr", "ssim")}
    summary["baseline"] = {metric: mean_interval(scores["real"][f"baseline_{metric}"], weights)
                           for metric in ("psnr", "ssim")}
    summary["difference"] = {}
    for metric in ("psnr", "ssim"):
        diff = scores["synthetic"][metric] - scores["real"][metric]
        summary["difference"][metric] = mean_interval(diff, weights)
        if margins is not None:
            summary["difference"][metric]["equivalence"] = equivalence(diff, weights,
                                                                       margins[metric])
    return summary
