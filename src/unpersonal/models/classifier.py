"""The downstream classifier's network: a `ResNetEncoder` and a linear head of one logit per
label column."""

from __future__ import annotations

from torch import Tensor, nn

from unpersonal.models.encoder import ResNetEncoder


class ClassifierNet(nn.Module):
    """ResNetEncoder + a linear head: images [B, 1, R, R] in [0, 1] -> logits [B, C]."""

    def __init__(self, width: int, outputs: int) -> None:
        super().__init__()
        self.width = width
        self.encoder = ResNetEncoder(in_channels=1, width=width)
        self.head = nn.Linear(self.encoder.out_features, outputs)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images * 2 - 1))
