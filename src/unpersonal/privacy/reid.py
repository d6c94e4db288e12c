"""The trained re-identification network as the privacy filter and the audit use it.

    model = load_reid(run.stage_path("fit-reid"))
    train_emb = model.embed(train_images)          # [N, dim] unit-norm: index them by inner product
    scores = model.score(candidate_emb, train_emb[nearest])
    rejected = model.flags(scores)                 # score >= the calibrated threshold

The score is an increasing function of the cosine similarity of two embeddings, so the training
images a candidate could score highest against are exactly its nearest neighbours by inner
product. Scores are computed in float64 numpy: with a steep learned scale, float32 sigmoids of
near-identical pairs round to 1.0 together, and a threshold compared with `>=` must not depend on
that rounding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from unpersonal.errors import UserError
from unpersonal.models.reid import ReidNet
from unpersonal.torch_utils import pick_device

EMBED_BATCH = 256


def cosine_to_score(cosine: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """sigmoid(scale * cosine + bias) in float64, written to stay finite for any logit."""
    logit = scale * np.asarray(cosine, dtype=np.float64) + bias
    return np.exp(-np.logaddexp(0.0, -logit))


@dataclass
class ReidModel:
    """A published re-ID network with its calibrated threshold."""

    net: ReidNet
    threshold: float  # on the score: flags `sensitivity` of held-out same-patient pairs
    threshold_cosine: float  # the same threshold on the cosine (for kNN index distances)
    scale: float
    bias: float
    resolution: int
    meta: dict[str, Any]
    device: torch.device

    @property
    def dim(self) -> int:
        return self.net.head[0].out_features

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Images float [N, R, R] in [0, 1] -> unit-norm float32 embeddings [N, dim]."""
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.resolution, self.resolution):
            raise UserError(f"re-ID network expects images [N, {self.resolution}, "
                            f"{self.resolution}], got {list(images.shape)}")
        out = np.empty((len(images), self.dim), np.float32)
        for start in range(0, len(images), EMBED_BATCH):
            batch = torch.from_numpy(images[start:start + EMBED_BATCH].astype(np.float32))
            out[start:start + len(batch)] = self.net.embed(
                batch.unsqueeze(1).to(self.device)).float().cpu().numpy()
        return out

    def score(self, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
        """Scores of row pairs (emb_a[i], emb_b[i]) -> float64 [N]."""
        if emb_a.shape != emb_b.shape:
            raise ValueError(f"row-wise scores need equal shapes, got {emb_a.shape} and "
                             f"{emb_b.shape}")
        cosine = np.einsum("nd,nd->n", emb_a.astype(np.float64), emb_b.astype(np.float64))
        return cosine_to_score(cosine, self.scale, self.bias)

    def score_matrix(self, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
        """Scores of every pair -> float64 [N_a, N_b]."""
        cosine = emb_a.astype(np.float64) @ emb_b.astype(np.float64).T
        return cosine_to_score(cosine, self.scale, self.bias)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """True where a pair is as likely the same patient as the calibrated threshold says."""
        return np.asarray(scores) >= self.threshold


def load_reid(folder: Path, device: torch.device | str | None = None) -> ReidModel:
    """The network `fit-reid` published in `folder`, in eval mode, with its threshold."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "reid.json").read_text())
        weights = load_file(str(folder / "reid.safetensors"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{folder}: no readable re-ID network ({error}); run `unpersonal "
                        "fit-reid` first") from None
    arch = meta["architecture"]
    net = ReidNet(arch["width"], arch["dim"], arch["blocks_per_stage"], arch["input_size"])
    net.load_state_dict(weights)
    chosen = torch.device(device) if device is not None else pick_device()
    net = net.to(chosen).eval().requires_grad_(False)
    return ReidModel(net, float(meta["threshold"]), float(meta["threshold_cosine"]),
                     float(net.log_scale.exp()), float(net.bias), int(arch["resolution"]), meta,
                     chosen)
