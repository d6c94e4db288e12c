"""The released set on disk: PNG files and the labels.csv that lists them.

    syn-000000.png ...   grey PNGs at the data's bit depth (8 or 16), no text chunks
    labels.csv           path (the PNG's name), then one 0/1 or class column per label

`generate` writes it (generate/synthetic/) and `export` copies it (export/images/ and
export/labels.csv), both through here, so the format is defined once. Nothing in it points back
at a patient: file names are numbers, and the labels are the only data.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from unpersonal.rundir import write_atomic

LABELS_FILE = "labels.csv"


def image_names(count: int) -> list[str]:
    """The released images' file names, numbered in release order."""
    return [f"syn-{n:06d}.png" for n in range(count)]


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grey PNG, 8-bit for uint8 and 16-bit for uint16 pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def labels_csv(names: list[str], labels: np.ndarray, label_names: list[str]) -> bytes:
    """The table of a set: one row per image, its file name and its labels."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", *label_names])
    for name, row in zip(names, labels):
        writer.writerow([name, *(int(value) for value in row)])
    return table.getvalue().encode()


def encode_set(images: np.ndarray, labels: np.ndarray, label_names: list[str]
               ) -> dict[str, bytes]:
    """A set's files by name: `image_names` PNGs of `images`, then labels.csv."""
    names = image_names(len(images))
    return {**{name: png_bytes(pixels) for name, pixels in zip(names, images)},
            LABELS_FILE: labels_csv(names, labels, label_names)}


def read_names(folder: Path) -> list[str]:
    """The image files a set's labels.csv lists, in its order."""
    with open(folder / LABELS_FILE, newline="") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


def read_pixels(folder: Path, names: list[str]) -> Iterable[np.ndarray]:
    """The pixels of the named images, one at a time, as stored (uint8 or uint16)."""
    return (np.asarray(Image.open(folder / name)) for name in names)


def read_files(folder: Path, names: list[str], images_in: str = "") -> dict[str, bytes]:
    """A set's files as stored, the named images under `images_in` (a folder, or '' beside
    labels.csv), then labels.csv: what a copy of the set writes."""
    prefix = f"{images_in}/" if images_in else ""
    return {**{f"{prefix}{name}": (folder / name).read_bytes() for name in names},
            LABELS_FILE: (folder / LABELS_FILE).read_bytes()}


def write_files(folder: Path, files: Iterable[tuple[str, bytes]]) -> None:
    """Write (relative path, content) pairs under `folder`, each atomically."""
    for relative, content in files:
        write_atomic(folder / relative, content)
