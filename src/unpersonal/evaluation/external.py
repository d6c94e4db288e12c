"""Any folder of images as a release to audit (`unpersonal audit --release DIR`): one made by this
tool, by another generator, or by hand.

    DIR/labels.csv    optional: `path` then one column per label of the run (as `generate`
                      writes it); the images it lists are the release
    DIR/metadata.csv  read the same way when there is no labels.csv, its first column
                      `file_name` (as `export` writes it, the table Hugging Face reads)
    DIR/*.png ...     otherwise every PNG/JPEG/TIFF/BMP file in DIR (or, when DIR has none, in
                      DIR/images/, as `export` lays a release out); other files are ignored

Each image is read and brought to the run's resolution the way `prepare` brings real images
(grey, `data.fit` to a square, Lanczos resize), so the audit compares like with like; a note
says what was resized. Every problem is a `UserError` naming the file, raised before anything
is written.
"""

from __future__ import annotations

import csv
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unpersonal.data.pixels import fit_square, resize, to_grey
from unpersonal.data.readers.images import IMAGE_SUFFIXES, pil_to_float
from unpersonal.errors import UserError
from unpersonal.release import IMAGES_FOLDER, LABELS_FILE, METADATA_FILE

PATH_COLUMNS = {LABELS_FILE: "path", METADATA_FILE: "file_name"}


@dataclass
class ExternalRelease:
    """A folder's images at the run's resolution, float [N, R, R] in [0, 1], and their labels
    when the folder has a labels.csv or metadata.csv."""

    images: np.ndarray
    names: list[str]
    labels: np.ndarray | None
    notes: list[str] = field(default_factory=list)


def read_release_folder(folder: Path, resolution: int, fit: str, label_names: list[str]
                        ) -> ExternalRelease:
    """Read and check a release folder; see the module docstring."""
    if not folder.is_dir():
        raise UserError(f"--release {folder}: no such folder")
    table = next((folder / name for name in PATH_COLUMNS if (folder / name).is_file()), None)
    if table is not None:
        names, labels = _read_labels(table, PATH_COLUMNS[table.name], label_names)
        paths = [_listed_file(folder, table, line, name)
                 for line, name in enumerate(names, start=2)]
    else:
        paths = _image_files(folder)
        names, labels = [path.relative_to(folder).as_posix() for path in paths], None
    notes: list[str] = []
    sizes: Counter[tuple[int, int]] = Counter()
    images = np.empty((len(paths), resolution, resolution), np.float32)
    for row, (path, name) in enumerate(zip(paths, names)):
        pixels = _load(path, name)
        grey, _ = to_grey(pixels)
        sizes[grey.shape] += 1
        images[row] = resize(fit_square(grey, fit), resolution)
    other = {size: count for size, count in sizes.items() if size != (resolution, resolution)}
    if other:
        listed = ", ".join(f"{count} at {w}x{h}" for (h, w), count in sorted(other.items()))
        notes.append(f"{sum(other.values())} of {len(paths)} images resized to {resolution} px "
                     f"as prepare would (data.fit = {fit}): {listed}")
    return ExternalRelease(images, names, labels, notes)


def _read_labels(table: Path, path_column: str, label_names: list[str]
                 ) -> tuple[list[str], np.ndarray]:
    """labels.csv or metadata.csv: the path column and the run's label columns, one 0/1 value
    per cell (a multi-class label is one column per class, as `generate` writes it)."""
    expected = [path_column, *label_names]
    try:
        with open(table, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != expected:
                raise UserError(f"{table}: columns {reader.fieldnames}, expected {expected} "
                                "(the run's labels)")
            rows = list(reader)
    except UnicodeDecodeError:
        raise UserError(f"{table}: not a text CSV file") from None
    if not rows:
        raise UserError(f"{table} lists no images")
    labels = np.zeros((len(rows), len(label_names)), np.uint8)
    for line, row in enumerate(rows, start=2):
        for column, name in enumerate(label_names):
            value = (row[name] or "").strip()
            if value not in ("0", "1"):
                raise UserError(f"{table} line {line}: {name} is {value!r}, expected 0 or 1")
            labels[line - 2, column] = int(value)
    return [row[path_column] for row in rows], labels


def _listed_file(folder: Path, table: Path, line: int, name: str) -> Path:
    """A file the table names: beside it, or in images/; never outside the folder."""
    for base in (folder, folder / IMAGES_FOLDER):
        path = (base / name).resolve()
        if path.is_file() and path.is_relative_to(folder.resolve()):
            return path
    raise UserError(f"{table} line {line}: {name!r} is not a file in {folder} or its "
                    f"{IMAGES_FOLDER}/ folder")


def _image_files(folder: Path) -> list[Path]:
    """The image files in the folder, or else in its images/ subfolder, by name."""
    for base in (folder, folder / IMAGES_FOLDER):
        found = sorted(path for path in base.glob("*")
                       if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
        if found:
            return found
    raise UserError(f"--release {folder}: no images (PNG, JPEG, TIFF or BMP files) in it or in "
                    f"its {IMAGES_FOLDER}/ folder")


def _load(path: Path, name: str) -> np.ndarray:
    """One file, one 2-D image, float32 in [0, 1]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                frames = getattr(image, "n_frames", 1)
                if frames > 1:
                    raise UserError(f"{name}: holds {frames} frames ({image.format}); one image "
                                    "per file")
                image.load()
                pixels = pil_to_float(image)
    except Image.DecompressionBombError:
        raise UserError(f"{name}: too many pixels (Pillow refuses it as a possible "
                        "decompression bomb)") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image Pillow can read") from None
    except OSError as error:
        reason = "; ".join(str(error).replace(str(path), name).splitlines())
        raise UserError(f"{name}: cannot read the image ({reason})") from None
    if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 2:
        raise UserError(f"{name}: image of shape {pixels.shape}, expected a 2-D image")
    return pixels
