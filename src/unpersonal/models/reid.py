"""The patient re-identification network: "are these two images of the same patient?".

A Siamese encoder: each image maps to a unit-norm embedding, and the score of a pair depends on
the two images only through the cosine similarity of their embeddings,

    score(a, b) = sigmoid(exp(log_scale) * cos(e_a, e_b) + bias),

with the scale kept positive by its exponential parametrisation. The score is therefore strictly
increasing in the cosine, which is what makes the privacy filter exact and cheap: the training
images that could score highest against a candidate are its nearest neighbours by inner product,
so a kNN index over training embeddings finds them, and only those need scoring.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from unpersonal.models.encoder import ResNetEncoder, downsampled, unit_norm


class ReidNet(nn.Module):
    """Images [B, 1, R, R] in [0, 1] -> unit-norm embeddings [B, dim]; pairs -> scores in (0, 1).

    Images larger than `input_size` are area-downsampled to it first: on Kermany chest X-rays a
    network on 32 px copies of 64 px images re-identified patients as well as one on the full
    64 px, at a quarter of the cost, so the saved time is better spent on width and steps.
    """

    def __init__(self, width: int = 32, dim: int = 128, blocks_per_stage: int = 1,
                 input_size: int | None = None, stem_stride: int = 1) -> None:
        super().__init__()
        self.input_size = input_size
        self.encoder = ResNetEncoder(1, width, blocks_per_stage, stem_stride)
        # Batch-normalising the projection centres the embeddings, so two unrelated images start
        # near cosine 0 rather than near 1 (pooled ReLU features all point the same way).
        self.head = nn.Sequential(nn.Linear(self.encoder.out_features, dim),
                                  nn.BatchNorm1d(dim))
        # At the start a cosine of 0.5 scores 0.5; training moves both where the data says.
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def embed(self, images: Tensor) -> Tensor:
        return unit_norm(self.head(self.encoder(downsampled(images, self.input_size))))

    def logit(self, cosine: Tensor) -> Tensor:
        """The pre-sigmoid score: an increasing affine map of the cosine (BCE works on this)."""
        return self.log_scale.exp() * cosine + self.bias

    def score_from_cosine(self, cosine: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(cosine))

    def forward(self, images_a: Tensor, images_b: Tensor) -> Tensor:
        """Row-wise pair scores of two image batches."""
        cosine = (self.embed(images_a) * self.embed(images_b)).sum(dim=-1)
        return self.score_from_cosine(cosine)
