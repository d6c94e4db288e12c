"""The canonical dataset `prepare` writes and every later stage reads.

    prepare/arrays.npz   images [N, R, R] uint8|uint16, labels [N, C] uint8,
                         patient_id [N] str, split [N] str, ref [N] str (where each image came from)
    prepare/dataset.json what the arrays mean: label kind and names, bit depth, resolution,
                         per-split summary, notes and warnings from reading

Patient IDs and source references stay in the run directory: they are needed to check privacy
against every training patient, and nothing that is exported may carry them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unpersonal.rundir import write_atomic, write_npz_atomic

FORMAT_VERSION = 1
ARRAYS = "arrays.npz"
META = "dataset.json"


@dataclass
class CanonicalDataset:
    images: np.ndarray
    labels: np.ndarray
    patient_id: np.ndarray
    split: np.ndarray
    ref: np.ndarray
    label_names: list[str]
    label_kind: str
    bit_depth: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, split: str) -> CanonicalDataset:
        """The rows of one split (train, val or test), same label space."""
        return self.rows(self.split == split)

    def rows(self, keep: np.ndarray) -> CanonicalDataset:
        """These rows (a bool mask or indices), same label space."""
        return CanonicalDataset(self.images[keep], self.labels[keep], self.patient_id[keep],
                                self.split[keep], self.ref[keep], self.label_names,
                                self.label_kind, self.bit_depth, self.meta)

    def images_float(self) -> np.ndarray:
        """Images as float32 in [0, 1], whatever the stored depth."""
        return self.images.astype(np.float32) / float((1 << self.bit_depth) - 1)


def save_canonical(folder: Path, data: CanonicalDataset) -> dict[str, Any]:
    """Write both files atomically; `meta` goes to dataset.json with the array layout, which is
    returned."""
    write_npz_atomic(folder / ARRAYS, images=data.images, labels=data.labels,
                     patient_id=data.patient_id, split=data.split, ref=data.ref)
    meta = {"format_version": FORMAT_VERSION, "n_images": len(data), "resolution": data.resolution,
            "bit_depth": data.bit_depth, "label_kind": data.label_kind,
            "label_names": data.label_names, **data.meta}
    write_atomic(folder / META, json.dumps(meta, indent=2) + "\n")
    return meta


def load_canonical(folder: Path) -> CanonicalDataset:
    meta = json.loads((folder / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / META}: format {meta.get('format_version')}, "
                         f"expected {FORMAT_VERSION}; rerun `unpersonal prepare --force`")
    with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
        return CanonicalDataset(
            images=arrays["images"], labels=arrays["labels"], patient_id=arrays["patient_id"],
            split=arrays["split"], ref=arrays["ref"], label_names=list(meta["label_names"]),
            label_kind=meta["label_kind"], bit_depth=int(meta["bit_depth"]), meta=meta)
