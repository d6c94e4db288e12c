"""EDM preconditioning, the EDM2 training loss and its learning-rate schedule.

Why preconditioning: the UNet sees inputs and targets of unit variance at every noise level.
`Denoiser` scales the noisy image by c_in, mixes the net's output with the input through c_skip
and c_out, and feeds the noise level as c_noise = log(sigma) / 4 (Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models"). The sampler and the loss only ever see
D(x; sigma), the denoised image.

Why a learned uncertainty in the loss: how hard denoising is differs by orders of magnitude across
noise levels; EDM2 (Karras et al. 2024) lets a tiny side network predict log(variance) per noise
level and weighs each sample's error by it, which balances the noise levels without hand tuning.

Everything runs in float32: the models trained here are small, and mixed precision would add
loss-scaling machinery for little speed on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from unpersonal.models.unet import MPConv, MPFourier, UNet


class Denoiser(nn.Module):
    """D(x; sigma, cond) with EDM preconditioning (c_skip, c_out, c_in, c_noise) around a UNet."""

    def __init__(self, net: UNet, sigma_data: float = 0.5, logvar_channels: int = 128) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1)

    @property
    def cond_dim(self) -> int:
        return self.net.cond_dim

    @property
    def img_channels(self) -> int:
        return self.net.img_channels

    @property
    def img_resolution(self) -> int:
        return self.net.img_resolution

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in, c_noise for noise levels `sigma` (same shape as `sigma`)."""
        variance = sigma ** 2 + self.sigma_data ** 2
        c_skip = self.sigma_data ** 2 / variance
        c_out = sigma * self.sigma_data / variance.sqrt()
        c_in = 1 / variance.sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None,
                 return_logvar: bool = False, sigma_checked: bool = False
                 ) -> Tensor | tuple[Tensor, Tensor]:
        """Denoised `x` (float32, x's shape); with `return_logvar`, also log(variance) [B, 1, 1, 1].

        `sigma` is one noise level per sample ([B]) or one for all (a scalar); it must be > 0.
        `sigma_checked`: the caller drew `sigma` > 0 itself, so the check is skipped (under
        `torch.func.vmap`, which cannot branch on a tensor's values).
        """
        x = x.to(torch.float32)
        if sigma_checked:
            sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        else:
            sigma = _per_sample_sigma(sigma, batch=x.shape[0], device=x.device)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1)
                                        for c in self.preconditioning(sigma))
        raw = self.net(c_in * x, c_noise.reshape(-1), cond)
        denoised = c_skip * x + c_out * raw.to(torch.float32)
        if not return_logvar:
            return denoised
        logvar = self.logvar_linear(self.logvar_fourier(c_noise.reshape(-1)))
        return denoised, logvar.reshape(-1, 1, 1, 1)


def _per_sample_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """`sigma` as a float32 [B] tensor; refuses sigma <= 0, where log(sigma) would give NaNs."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
    if not bool((sigma > 0).all()):
        raise ValueError("sigma must be > 0 (the sampler's last step to sigma = 0 needs no "
                         "denoiser call)")
    return sigma


class EDM2Loss:
    """Per-sample loss: log-normal sigma (P_mean, P_std), EDM weighting, learned uncertainty.

    Returns one value per image, the mean over its pixels of
    weight(sigma) / exp(u(sigma)) * (D(y + n; sigma) - y)^2 + u(sigma), which is minimal when
    u(sigma) is the log of the weighted error expected at that noise level.
    """

    def __init__(self, p_mean: float = -0.4, p_std: float = 1.0, sigma_data: float = 0.5) -> None:
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data

    def __call__(self, denoiser: Denoiser, images: Tensor, cond: Tensor | None,
                 generator: torch.Generator | None = None) -> Tensor:
        images = images.to(torch.float32)
        sigma = self.sample_sigma(images.shape[0], images.device, generator)
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        return self.given(denoiser, images, sigma, noise, cond)

    def given(self, denoiser: nn.Module, images: Tensor, sigma: Tensor, noise: Tensor,
              cond: Tensor | None = None) -> Tensor:
        """The per-sample loss at noise levels `sigma` [B, 1, 1, 1] (> 0) with unit `noise`
        already drawn: nothing random inside, so `torch.func` can take it per patient."""
        denoised, logvar = denoiser(images + noise * sigma, sigma, cond, return_logvar=True,
                                    sigma_checked=True)
        weighted = self.weight(sigma) / logvar.exp() * (denoised - images) ** 2 + logvar
        return weighted.mean(dim=tuple(range(1, weighted.ndim)))

    def sample_sigma(self, batch: int, device: torch.device,
                     generator: torch.Generator | None = None) -> Tensor:
        """Noise levels [B, 1, 1, 1] with log(sigma) ~ N(p_mean, p_std^2)."""
        normal = torch.randn(batch, 1, 1, 1, generator=generator, device=device)
        return (normal * self.p_std + self.p_mean).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        """EDM's lambda(sigma) = 1 / c_out^2: the denoised error weighted to unit scale."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


def learning_rate(step: int, ref_lr: float, ref_steps: int, warmup_steps: int = 0) -> float:
    """EDM2 inverse-square-root decay after ref_steps, with optional linear warm-up.

    `step` is the 0-based index of the optimiser step about to be taken. The warm-up reaches
    ref_lr at step warmup_steps - 1 (the first step is not wasted at lr 0); then lr stays at
    ref_lr until ref_steps and falls as ref_lr / sqrt(step / ref_steps). ref_steps = 0 means no
    decay. Forced weight normalisation is what makes this simple schedule work: with unit-norm
    weights, lr is directly the size of each step's change of direction.
    """
    if step < 0 or ref_steps < 0 or warmup_steps < 0 or ref_lr < 0:
        raise ValueError(f"learning_rate needs non-negative arguments, got step={step}, "
                         f"ref_lr={ref_lr}, ref_steps={ref_steps}, warmup_steps={warmup_steps}")
    lr = ref_lr
    if ref_steps > 0:
        lr /= math.sqrt(max(step / ref_steps, 1.0))
    if warmup_steps > 0:
        lr *= min((step + 1) / warmup_steps, 1.0)
    return lr


def count_parameters(module: nn.Module) -> int:
    """Number of values in the module's parameters (buffers, e.g. Fourier frequencies, excluded)."""
    return sum(parameter.numel() for parameter in module.parameters())
