"""The embedder `fit-embedder` publishes (and `audit-embedder`, the audit's own): unit-norm
features in which pseudo-conditioning, the fidelity metrics and the distance floor work.

    embedder = load_embedder(run.stage_path("fit-embedder"))
    features = embedder.embed(images)     # float [N, R, R] in [0, 1] -> unit-norm float32 [N, D]

The folder holds embedder.json and the network: our `FeatureNet` as embedder.safetensors (the
weights format is described in `unpersonal.training.embedder`, which writes it), or the user's
TorchScript extractor copied as extractor.pt.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from unpersonal.artifacts.batched import predict_batched
from unpersonal.errors import UserError, first_line
from unpersonal.models.embedder import FeatureNet
from unpersonal.models.encoder import unit_norm
from unpersonal.torch_utils import pick_device

WEIGHTS_FORMAT = "unpersonal-embedder-v1"  # the safetensors metadata key of the architecture
EMBED_BATCH = 256


@dataclass
class Embedder:
    """A frozen feature network; `embed` gives unit-norm float32 features."""

    network: nn.Module  # float [B, 1, R, R] in [0, 1] -> [B, dim], in eval mode
    resolution: int
    dim: int
    device: torch.device

    def embed(self, images: np.ndarray) -> np.ndarray:
        """images: float [N, R, R] in [0, 1] -> unit-norm features float32 [N, D]."""
        return predict_batched(lambda batch: unit_norm(self.network(batch).float()), images,
                               resolution=self.resolution, width=self.dim, device=self.device,
                               batch_size=EMBED_BATCH, model="the embedder")


def load_embedder(folder: Path) -> Embedder:
    """The embedder published in `folder` (`run.stage_path("fit-embedder")`), on pick_device()."""
    meta = json.loads((Path(folder) / "embedder.json").read_text())
    device = pick_device()
    network, _ = load_network(Path(folder) / meta["weights"], device)
    return Embedder(network, int(meta["resolution"]), int(meta["dim"]), device)


def load_network(path: Path, device: torch.device) -> tuple[nn.Module, str]:
    """A feature network in eval mode, by suffix: .safetensors = our weights format, else
    TorchScript; and the format's name."""
    if path.suffix == ".safetensors":
        return load_feature_net(path).to(device), "safetensors"
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript but still loads it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as error:  # TorchScript reports bad archives as several error types
        raise UserError(f"embedder.extractor {path}: not a TorchScript file "
                        f"({first_line(error)}); save one with torch.jit.save, or give our "
                        ".safetensors weights format") from None
    return module.eval(), "torchscript"


def load_feature_net(path: Path) -> FeatureNet:
    """Rebuild a `FeatureNet` from a weights file alone; UserError naming the file otherwise."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
    if WEIGHTS_FORMAT not in metadata:
        raise UserError(f"{path}: no {WEIGHTS_FORMAT!r} key in its safetensors metadata, the "
                        "architecture {in_channels, width, blocks_per_stage, dim} (see "
                        "unpersonal.training.embedder)")
    try:
        arch = json.loads(metadata[WEIGHTS_FORMAT])
        if arch.get("in_channels", 1) != 1:
            raise ValueError(f"in_channels {arch['in_channels']}, expected 1 (grey images)")
        network = FeatureNet(int(arch["width"]), int(arch["dim"]),
                             int(arch.get("blocks_per_stage", 1)), arch.get("input_size"))
        network.load_state_dict(load_file(str(path)))
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise UserError(f"{path}: weights do not match the architecture in its metadata "
                        f"({first_line(error)})") from None
    return network.eval()
