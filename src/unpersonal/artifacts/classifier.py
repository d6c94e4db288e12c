"""The downstream classifier `fit-classifier` publishes, the same kind `fit_classifier` returns:
label probabilities of images.

    classifier = load_classifier(run.stage_path("fit-classifier"))
    probs = classifier.predict_proba(images)   # float [N, R, R] in [0, 1] -> float32 [N, C]

`generate` scores its candidates' labels with the published one; `evaluate` trains more (on
real, synthetic and both) and scores the real test images with each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from unpersonal.artifacts.batched import predict_batched
from unpersonal.models.classifier import ClassifierNet
from unpersonal.torch_utils import pick_device

PREDICT_BATCH = 512


def probabilities(logits: Tensor, label_kind: str) -> Tensor:
    """Softmax over the classes when exactly one holds, else an independent sigmoid per column."""
    return logits.softmax(dim=1) if label_kind == "multiclass" else logits.sigmoid()


@dataclass
class Classifier:
    """A trained classifier, ready to score images; `history` says how it was trained."""

    net: ClassifierNet  # in eval mode
    label_kind: str
    label_names: list[str]
    resolution: int
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """images float [N, R, R] in [0, 1] -> probabilities [N, C] (float32)."""
        return predict_batched(lambda batch: probabilities(self.net(batch), self.label_kind),
                               images, resolution=self.resolution, width=len(self.label_names),
                               device=self.device, batch_size=PREDICT_BATCH,
                               model="the classifier")


def load_classifier(folder: Path) -> Classifier:
    """A saved classifier in eval mode, rebuilt from classifier.json alone (no config needed)."""
    meta = json.loads((folder / "classifier.json").read_text())
    architecture = meta["architecture"]
    net = ClassifierNet(architecture["width"], architecture["outputs"],
                        architecture.get("input_size"))
    net.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    net.to(pick_device()).eval().requires_grad_(False)
    return Classifier(net, meta["label_kind"], list(meta["label_names"]), int(meta["resolution"]),
                      meta.get("training", {}))
