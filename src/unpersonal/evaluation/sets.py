"""What the audit and the evaluation read: the released set, and the audit's own models.

    run/audit-embedder/   an embedder trained like fit-embedder's, other seed and width
    run/audit-reid/       a re-ID network trained like fit-reid's, other seed and width

The audit must not restate the filter: a set selected to pass the filter's models would look
private to those same models whatever it leaks, so it is judged by models it was never selected
against, trained on the same training patients.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unpersonal.errors import UserError

AUDIT_EMBEDDER = "audit-embedder"
AUDIT_REID = "audit-reid"


@dataclass
class SyntheticSet:
    """A set to judge: images float [N, R, R] in [0, 1] and labels [N, C] as released."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]


def read_synthetic_set(folder: Path, label_names: list[str]) -> SyntheticSet:
    """The released set as a user receives it: labels.csv (path, one column per label) + PNGs.

    Reading the files, not generate's arrays, means what is judged is exactly what leaves.
    """
    table = folder / "labels.csv"
    if not table.is_file():
        raise UserError(f"{folder} has no labels.csv; run `unpersonal generate` first")
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != ["path", *label_names]:
            raise UserError(f"{table}: columns {reader.fieldnames}, expected "
                            f"{['path', *label_names]}")
        rows = list(reader)
    if not rows:
        raise UserError(f"{table} lists no images: generate accepted none, nothing to judge")
    images = []
    for line, row in enumerate(rows, start=2):
        path = folder / row["path"]
        try:
            pixels = np.asarray(Image.open(path))
        except OSError as error:
            raise UserError(f"{table} line {line}: cannot read {row['path']} ({error})") from None
        images.append(pixels.astype(np.float32) / (65535.0 if pixels.dtype == np.uint16 else 255.0))
    labels = np.array([[int(row[name]) for name in label_names] for row in rows], np.uint8)
    return SyntheticSet(np.stack(images), labels, [row["path"] for row in rows])
