"""The downstream classifier's network: a `ResNetEncoder` and a linear head of one logit per
label column."""

from __future__ import annotations

from torch import Tensor, nn

from unpersonal.models.encoder import ResNetEncoder, downsampled


class ClassifierNet(nn.Module):
    """ResNetEncoder + a linear head: images [B, 1, R, R] in [0, 1] -> logits [B, C]."""

    def __init__(self, width: int, outputs: int, input_size: int | None = None) -> None:
        super().__init__()
        self.width = width
        self.input_size = input_size
        self.encoder = ResNetEncoder(in_channels=1, width=width)
        self.head = nn.Linear(self.encoder.out_features, outputs)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(downsampled(images, self.input_size) * 2 - 1))
