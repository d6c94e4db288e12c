"""Condition vectors: what the denoiser is told about the image it should draw.

One vector per image, `[label code | pseudo feature]`, each part scaled to unit RMS so neither
drowns the other. The all-zero vector is the null condition (classifier-free guidance), so every
real condition must be non-zero: a binary label is coded as the pair (1 - y, y), never as a bare
0 that would read as "no condition".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("uncond", "class", "pseudo", "class+pseudo")


def label_code(labels: np.ndarray, kind: str) -> np.ndarray:
    """uint8 labels [N, C] -> float32 code [N, L] with no all-zero row.

    Multi-class labels are already one-hot. Binary and multi-label columns each become two
    slots (absent, present), so "no finding" is a condition of its own.
    """
    values = labels.astype(np.float32)
    if kind == "multiclass":
        return values
    return np.stack([1.0 - values, values], axis=2).reshape(len(values), -1)


def _unit_rms(part: torch.Tensor) -> torch.Tensor:
    """Scale each row to norm sqrt(dim) (unit RMS); all-zero rows stay zero."""
    norm = part.norm(dim=1, keepdim=True)
    return part * (part.shape[1] ** 0.5) / norm.clamp_min(1e-8)


@dataclass(frozen=True)
class Conditioner:
    """Builds condition vectors for one conditioning mode and knows their layout."""

    mode: str
    label_dim: int
    pseudo_dim: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"conditioning mode {self.mode!r} is not one of {MODES}")

    @property
    def uses_labels(self) -> bool:
        return "class" in self.mode

    @property
    def uses_pseudo(self) -> bool:
        return "pseudo" in self.mode

    @property
    def dim(self) -> int:
        return self.label_dim * self.uses_labels + self.pseudo_dim * self.uses_pseudo

    def parts(self) -> list[slice]:
        """Where each part sits in the vector; condition dropout drops parts independently."""
        slices, start = [], 0
        for used, width in ((self.uses_labels, self.label_dim), (self.uses_pseudo, self.pseudo_dim)):
            if used:
                slices.append(slice(start, start + width))
                start += width
        return slices

    def build(self, codes: torch.Tensor | None, pseudo: torch.Tensor | None) -> torch.Tensor | None:
        """The condition for a batch; None for an unconditional model."""
        pieces = []
        if self.uses_labels:
            pieces.append(_unit_rms(_required(codes, "label codes").float()))
        if self.uses_pseudo:
            pieces.append(_unit_rms(_required(pseudo, "pseudo features").float()))
        return torch.cat(pieces, dim=1) if pieces else None

    def null(self, codes: torch.Tensor | None, pseudo: torch.Tensor | None, against: str
             ) -> torch.Tensor | None:
        """What classifier-free guidance pushes away from: None (the empty condition), or with
        `against="labels"` for a model told the labels, the labels alone. Then the guidance
        weight weighs the pseudo-condition only, and w = 0 samples the class-conditional model;
        for a model told the labels alone the null is its condition, and no weight changes it."""
        if against == "empty" or not self.uses_labels:
            return None
        if not self.uses_pseudo:
            return self.build(codes, None)
        return self.build(codes, torch.zeros_like(_required(pseudo, "pseudo features")))

    def drop(self, cond: torch.Tensor | None, rate: float, generator: torch.Generator
             ) -> torch.Tensor | None:
        """Zero each part of each row with probability `rate` (trains the null condition)."""
        if cond is None or rate == 0:
            return cond
        out = cond.clone()
        for part in self.parts():
            # Drawn where the generator lives: a CUDA generator cannot fill a CPU tensor.
            dropped = torch.rand(len(cond), generator=generator, device=generator.device) < rate
            out[dropped.to(cond.device), part] = 0
        return out

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "label_dim": self.label_dim, "pseudo_dim": self.pseudo_dim}


def neighbour_conditions(pseudo: np.ndarray, patient: np.ndarray, labels: np.ndarray, k: int,
                         block: int = 1024) -> np.ndarray:
    """Each training image's pseudo-condition replaced by the mean of its k nearest (by cosine)
    training images of other patients with the same labels, scaled to unit norm.

    The source's own embedding carries its patient: on Kermany a candidate drawn from it at full
    weight is linked to that patient by the re-ID network almost every time. The mean of its
    neighbours keeps where in the data the source lies (its mode, what its class looks like
    there) and averages away what is peculiar to one patient. Same labels, so the condition does
    not pull against the label part. A row with fewer than k such neighbours averages those it
    has, and keeps its own embedding when it has none.
    """
    features = pseudo / np.linalg.norm(pseudo, axis=1, keepdims=True).clip(1e-8)
    label_key = np.unique(labels.reshape(len(labels), -1), axis=0, return_inverse=True)[1]
    label_key = label_key.reshape(-1)
    out = features.copy()
    for start in range(0, len(features), block):
        rows = np.arange(start, min(start + block, len(features)))
        similarity = features[rows] @ features.T
        excluded = ((patient[rows, None] == patient[None, :])
                    | (label_key[rows, None] != label_key[None, :]))
        similarity[excluded] = -np.inf
        count = min(k, len(features))
        nearest = np.argpartition(-similarity, count - 1, axis=1)[:, :count]
        valid = np.isfinite(np.take_along_axis(similarity, nearest, axis=1))
        summed = (features[nearest] * valid[:, :, None]).sum(axis=1)
        has_any = valid.any(axis=1)
        out[rows[has_any]] = summed[has_any]
    return (out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-8)).astype(pseudo.dtype)


def _required(value: torch.Tensor | None, what: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this conditioning mode needs {what}")
    return value
