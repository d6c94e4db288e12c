"""A small ResNet image encoder, the backbone of the embedder, the re-ID network and the classifier.

Written here rather than taken from MONAI or torchvision: torchvision does not load with the CPU
torch build, and at 32-128 px a four-stage ResNet of basic blocks is a screenful of code that
keeps the layer widths in one place. The three models differ only in their heads and losses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def downsampled(images: Tensor, size: int | None) -> Tensor:
    """Images larger than `size` area-averaged down to it (every pixel counts once, nothing
    aliases); smaller ones, or any with `size` None, as they are. Lets a network trained at a
    fixed cost serve data of any resolution."""
    if size is None or images.shape[-1] <= size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")


def unit_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows scaled to unit L2 norm, so inner products are cosine similarities."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_channels))
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Images [B, C, R, R] -> features [B, 8 * width], by global average pooling.

    Four stages of widths (w, 2w, 4w, 8w); every stage after the first halves the resolution, so
    a 32 px input ends at 4x4 and a 128 px one at 16x16. The stem keeps full resolution by
    default (no 7x7 stride-2 stem and max-pool as in ImageNet ResNets): small images cannot spare
    the pixels. `stem_stride` 2 halves it in the stem instead, so a 64 px input costs about what a
    32 px one does while its first convolution still sees every pixel.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, blocks_per_stage: int = 1,
                 stem_stride: int = 1) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for index, out_channels in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.out_features = channels

    def forward(self, images: Tensor) -> Tensor:
        return self.stages(self.stem(images)).mean(dim=(2, 3))
