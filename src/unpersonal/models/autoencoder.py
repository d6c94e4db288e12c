"""The autoencoder of latent diffusion: MONAI's `AutoencoderKL`, sized for grey images on a CPU.

Taken from MONAI rather than written here: it is the KL autoencoder of latent diffusion
(Rombach et al. 2022) as MONAI's generative models keep it, and at the sizes that fit a CPU
(width 8, one residual block per resolution, no attention) it trained at 27 images/s at 128 px on
one thread, twice our own encoder-decoder of the same depth at width 16 (benchmarks/latent.py).

The encoder gives a Gaussian posterior q(z | x) = N(mu, sigma^2) per latent pixel; training
samples z = mu + sigma * eps, the denoiser's data are the means mu (encoding is deterministic).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn


def architecture(width: int, factor: int, latent_channels: int, res_blocks: int
                 ) -> dict[str, Any]:
    """The keyword arguments of `build_autoencoder`, as model files store them."""
    return {"width": width, "factor": factor, "latent_channels": latent_channels,
            "res_blocks": res_blocks}


def build_autoencoder(width: int, factor: int, latent_channels: int, res_blocks: int
                      ) -> nn.Module:
    """AutoencoderKL mapping [B, 1, R, R] to latents [B, C, R/f, R/f] and back.

    Widths (w, 2w, 4w[, 8w]): one level per halving plus the full-resolution one. Group norm
    needs the widths divisible by its group count, hence groups = min(8, w) with w a multiple.
    """
    levels = int(math.log2(factor))
    if 2 ** levels != factor:
        raise ValueError(f"factor {factor} is not a power of 2")
    groups = math.gcd(width, 8)
    with warnings.catch_warnings():  # MONAI warns about optional packages it does not need here
        warnings.simplefilter("ignore")
        from monai.networks.nets import AutoencoderKL

        return AutoencoderKL(
            spatial_dims=2, in_channels=1, out_channels=1,
            channels=tuple(width * 2 ** level for level in range(levels + 1)),
            num_res_blocks=res_blocks, attention_levels=(False,) * (levels + 1),
            latent_channels=latent_channels, norm_num_groups=groups,
            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def kl_divergence(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over each image's latent, mean over the batch:
    0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)."""
    terms = mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1
    return 0.5 * terms.flatten(1).sum(1).mean()
