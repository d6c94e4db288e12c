"""The embedder's network: a `ResNetEncoder` and a linear head, whose unit-norm output is the
feature `fit-embedder` publishes (the self-supervised projector lives in the trainer)."""

from __future__ import annotations

from torch import Tensor, nn

from unpersonal.models.encoder import ResNetEncoder, downsampled


class FeatureNet(nn.Module):
    """Encoder + linear head: images [B, 1, R, R] -> features [B, dim], before normalisation.

    The published feature is unit_norm(head(encoder(x))), taken BEFORE the projection MLP the
    self-supervised loss sees. The projector learns to throw away what the views differ by
    (exposure, position, blur); the layer before it keeps more of the image, which serves
    downstream tasks better (Chen et al. 2020 report >10 points of linear-probe accuracy) and
    is what a distance safeguard needs to tell near-copies apart. The linear head fixes the
    feature size at `dim` whatever the encoder width, and is trained with everything else.
    """

    def __init__(self, width: int, dim: int, blocks_per_stage: int = 1,
                 input_size: int | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.encoder = ResNetEncoder(in_channels=1, width=width, blocks_per_stage=blocks_per_stage)
        self.head = nn.Linear(self.encoder.out_features, dim)
        self.architecture = {"in_channels": 1, "width": width, "blocks_per_stage": blocks_per_stage,
                             "dim": dim}
        if input_size is not None:  # absent at the default, so older weights files read the same
            self.architecture["input_size"] = input_size

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(downsampled(images, self.input_size)))
