"""The patient re-identification network `fit-reid` publishes (and `audit-reid`, the audit's
own), as the privacy filter and the audit use it.

    model = load_reid(run.stage_path("fit-reid"))
    train_emb = model.embed(train_images)          # [N, dim] unit-norm: index them by inner product
    scores = model.scorer.score(cosines)           # linked where >= model.scorer.threshold

The score, sigmoid(scale * cosine + bias), is an increasing function of the cosine similarity of
two embeddings, so the training images a candidate could score highest against are exactly its
nearest neighbours by inner product. Scores are computed in float64 numpy: with a steep learned
scale, float32 sigmoids of near-identical pairs round to 1.0 together, and a threshold compared
with `>=` must not depend on that rounding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from unpersonal.artifacts.batched import predict_batched
from unpersonal.errors import UserError
from unpersonal.models.reid import ReidNet
from unpersonal.torch_utils import pick_device

EMBED_BATCH = 256


def cosine_to_score(cosine: np.ndarray | float, scale: float, bias: float) -> np.ndarray:
    """sigmoid(scale * cosine + bias) in float64, written to stay finite for any logit."""
    logit = scale * np.asarray(cosine, dtype=np.float64) + bias
    return np.exp(-np.logaddexp(0.0, -logit))


@dataclass(frozen=True)
class ReidScorer:
    """A re-ID network's score and a threshold on it: its three published numbers, or another
    threshold the caller chose. Plain numbers, so the attacks can be tested with a hand-set one."""

    scale: float
    bias: float
    threshold: float

    def score(self, cosine: np.ndarray) -> np.ndarray:
        """The score of given cosines, float64."""
        return cosine_to_score(cosine, self.scale, self.bias)

    def score_matrix(self, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
        """Scores of every pair of unit-norm rows -> float64 [N_a, N_b]."""
        return self.score(np.asarray(emb_a, np.float64) @ np.asarray(emb_b, np.float64).T)


@dataclass
class ReidModel:
    """A published re-ID network with its calibrated scorer and reid.json."""

    net: ReidNet  # in eval mode
    scorer: ReidScorer  # threshold: flags `sensitivity` of held-out same-patient pairs
    resolution: int
    meta: dict[str, Any]
    device: torch.device

    @property
    def dim(self) -> int:
        return self.net.head[0].out_features

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Images float [N, R, R] in [0, 1] -> unit-norm float32 embeddings [N, dim]."""
        return predict_batched(self.net.embed, images, resolution=self.resolution, width=self.dim,
                               device=self.device, batch_size=EMBED_BATCH,
                               model="the re-ID network")


def load_reid(folder: Path) -> ReidModel:
    """The network published in `folder`, in eval mode on pick_device(), with its threshold."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "reid.json").read_text())
        weights = load_file(str(folder / "reid.safetensors"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{folder}: no readable re-ID network ({error}); run `unpersonal "
                        "fit-reid` first") from None
    arch = meta["architecture"]
    net = ReidNet(arch["width"], arch["dim"], arch["blocks_per_stage"], arch["input_size"],
                  int(arch.get("stem_stride", 1)))
    net.load_state_dict(weights)
    device = pick_device()
    net = net.to(device).eval().requires_grad_(False)
    scorer = ReidScorer(float(net.log_scale.exp()), float(net.bias), float(meta["threshold"]))
    return ReidModel(net, scorer, int(arch["resolution"]), meta, device)
