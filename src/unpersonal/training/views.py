"""Random views of grey medical images, and the light augmentation, batched on the images' device.

`random_views` serves the self-supervised embedder (two views of one image are a positive pair)
and the re-identification network (its positives without patient IDs, and robustness to
acquisition changes with them). Everything is one affine resampling plus a few pointwise
operations, so a batch of views costs about as much as one convolution layer.

`shift_and_jitter` is the light, label-keeping augmentation of the diffusion model and the
classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from unpersonal.config import ViewAugmentation


def random_views(images: Tensor, spec: ViewAugmentation, generator: torch.Generator) -> Tensor:
    """images: float [B, 1, R, R] in [0, 1] -> one random view of each, same shape and range."""
    images = _random_affine(images, spec, generator)
    images = _random_intensity(images, spec, generator)
    if spec.blur_sigma > 0:
        images = _random_blur(images, spec.blur_sigma, generator)
    if spec.noise > 0:
        std = spec.noise * _uniform(len(images), 0.0, 1.0, generator, images.device)
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        images = images + std[:, None, None, None] * noise
    return images.clamp(0.0, 1.0)


def _uniform(count: int, low: float, high: float, generator: torch.Generator,
             device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, device=device)


def _random_affine(images: Tensor, spec: ViewAugmentation, generator: torch.Generator) -> Tensor:
    """Crop-and-resize (zoom), rotation, shift and optional flip as one bilinear resampling.

    Border pixels are repeated rather than filled with black, which on a radiograph would read as
    a collimator edge.
    """
    batch, device = len(images), images.device
    scale = _uniform(batch, *spec.crop_scale, generator, device)
    angle = _uniform(batch, -spec.rotate_degrees, spec.rotate_degrees, generator, device)
    angle = angle * (math.pi / 180)
    shift = _uniform(2 * batch, -spec.shift, spec.shift, generator, device).view(batch, 2) * 2
    flip = torch.ones(batch, device=device)
    if spec.flip:
        flip = torch.where(torch.rand(batch, generator=generator, device=device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
                         torch.stack([sin * flip, cos, shift[:, 1]], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _random_intensity(images: Tensor, spec: ViewAugmentation, generator: torch.Generator
                      ) -> Tensor:
    """Gamma, then contrast about the image mean, then brightness: exposure differences."""
    batch, device = len(images), images.device
    if spec.gamma > 0:
        log_gamma = _uniform(batch, -math.log1p(spec.gamma), math.log1p(spec.gamma), generator,
                             device)
        images = images.clamp_min(1e-6) ** torch.exp(log_gamma)[:, None, None, None]
    contrast = 1 + _uniform(batch, -spec.contrast, spec.contrast, generator, device)
    brightness = _uniform(batch, -spec.brightness, spec.brightness, generator, device)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]


def _random_blur(images: Tensor, max_sigma: float, generator: torch.Generator) -> Tensor:
    """A separable Gaussian blur with a per-image sigma in [0, max_sigma] (0 leaves it as is)."""
    batch, device = len(images), images.device
    sigma = _uniform(batch, 0.0, max_sigma, generator, device).clamp_min(1e-3)
    radius = max(1, math.ceil(2 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # [B, K]
    # Grouped convolution: one kernel per image, by folding the batch into channels.
    x = F.pad(images.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernels[:, None, None, :], groups=batch)
    x = F.conv2d(x, kernels[:, None, :, None], groups=batch)
    return x.transpose(0, 1)


def shift_and_jitter(images: Tensor, shift: int, intensity: float, generator: torch.Generator,
                     value_range: tuple[float, float], flip: bool = False) -> Tensor:
    """Whole-pixel shifts of up to `shift` (edge pixels repeated, never wrapped), contrast and
    brightness changes of up to `intensity`, and with `flip` left-right flips (off by default:
    anatomy is lateral).

    The light augmentation of the diffusion model and the classifier, which must keep what an
    image shows where it is: a finding can be a small patch near the edge, which a heavy crop or
    rotation (`random_views`) could move out while the label stays. images: float [B, 1, R, R]
    in `value_range` ([-1, 1] or [0, 1]); brightness moves by a share of that range.
    """
    batch, size, device = len(images), images.shape[-1], images.device
    if shift:
        padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
        offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator, device=device)
        pixels = torch.arange(size, device=device)
        rows = (offsets[:, 0, None] + pixels)[:, :, None]  # [B, R, 1]
        cols = (offsets[:, 1, None] + pixels)[:, None, :]  # [B, 1, R]
        images = padded[torch.arange(batch, device=device)[:, None, None], 0, rows, cols]
        images = images.unsqueeze(1)
    if intensity:
        low, high = value_range
        contrast = 1 + intensity * (2 * torch.rand(batch, 1, 1, 1, generator=generator,
                                                   device=device) - 1)
        brightness = intensity * (2 * torch.rand(batch, 1, 1, 1, generator=generator,
                                                 device=device) - 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean + (high - low) * brightness).clamp(low, high)
    if flip:
        flipped = torch.rand(batch, generator=generator, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    return images
