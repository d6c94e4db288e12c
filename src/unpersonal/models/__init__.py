"""The diffusion network: a magnitude-preserving UNet (EDM2), its EDM preconditioning and loss."""

from unpersonal.models.edm import Denoiser, EDM2Loss, count_parameters, learning_rate
from unpersonal.models.unet import UNet

__all__ = ["Denoiser", "EDM2Loss", "UNet", "count_parameters", "learning_rate"]
