"""The released set on disk: PNG files and the labels.csv that lists them.

    syn-000000.png ...   grey PNGs at the data's bit depth (8 or 16), no text chunks
    labels.csv           path (the PNG's name), then one 0/1 or class column per label

`generate` writes it (generate/synthetic/) and `export` copies it (export/images/, with the same
table as export/metadata.csv, whose `file_name` column is the path from the export folder: the
layout Hugging Face's `imagefolder` loader reads), both through here, so the format is defined
once. Nothing in it points back at a patient: file names are numbers, and the labels are the
only data.
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
METADATA_FILE = "metadata.csv"
IMAGES_FOLDER = "images"


def image_names(count: int) -> list[str]:
    """The released images' file names, numbered in release order."""
    return [f"syn-{n:06d}.png" for n in range(count)]


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grey PNG, 8-bit for uint8 and 16-bit for uint16 pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def labels_csv(names: list[str], labels: np.ndarray, label_names: list[str],
               path_column: str = "path") -> bytes:
    """The table of a set: one row per image, its file name and its labels."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow([path_column, *label_names])
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
    return [row["path"] for row in read_table(folder)]


def read_table(folder: Path) -> list[dict[str, str]]:
    """The rows of a set's labels.csv."""
    with open(folder / LABELS_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def read_pixels(folder: Path, names: list[str]) -> Iterable[np.ndarray]:
    """The pixels of the named images, one at a time, as stored (uint8 or uint16)."""
    return (np.asarray(Image.open(folder / name)) for name in names)


def export_files(folder: Path, names: list[str]) -> dict[str, bytes]:
    """The set's data files as the export lays them out: the named images, as stored, under
    images/, and their rows of labels.csv as metadata.csv, each path given from the export
    folder (`file_name`, the column Hugging Face's `imagefolder` loader joins on)."""
    rows = {row["path"]: row for row in read_table(folder)}
    label_names = [column for column in next(iter(rows.values())) if column != "path"]
    labels = np.array([[int(rows[name][label]) for label in label_names] for name in names],
                      np.int64).reshape(len(names), len(label_names))
    return {**{f"{IMAGES_FOLDER}/{name}": (folder / name).read_bytes() for name in names},
            METADATA_FILE: labels_csv([f"{IMAGES_FOLDER}/{name}" for name in names], labels,
                                      label_names, path_column="file_name")}


def write_files(folder: Path, files: Iterable[tuple[str, bytes]]) -> None:
    """Write (relative path, content) pairs under `folder`, each atomically."""
    for relative, content in files:
        write_atomic(folder / relative, content)
