"""The NumPy interface the published models share: images in, one row of numbers per image out.

Images are float [N, R, R] in [0, 1]; they go through the network in batches of [B, 1, R, R] on
its device, with gradients off, and come back as float32 NumPy [N, D].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from unpersonal.errors import UserError


def predict_batched(forward: Callable[[Tensor], Tensor], images: np.ndarray, *, resolution: int,
                    width: int, device: torch.device, batch_size: int, model: str) -> np.ndarray:
    """`forward` over `images` in batches -> float32 [N, width]; `model` names it in errors."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (resolution, resolution):
        raise UserError(f"{model} takes images [N, {resolution}, {resolution}], got "
                        f"{list(images.shape)}")
    out = np.empty((len(images), width), np.float32)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[start:start + batch_size], np.float32)
            batch = torch.from_numpy(batch).unsqueeze(1).to(device)
            out[start:start + len(batch)] = forward(batch).float().cpu().numpy()
    return out
