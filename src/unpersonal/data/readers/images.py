"""A folder of PNG/JPEG/TIFF/BMP images with a label CSV."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unpersonal.config import DataConfig
from unpersonal.data.readers.table import CsvRow, find_csv, one_line_reason, read_table
from unpersonal.data.source import Source
from unpersonal.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image_folder(folder: Path, config: DataConfig) -> Source:
    table = read_table(find_csv(folder, config.csv), folder, config.label_columns)
    depths = [_bit_depth(row) for row in table.rows]
    return Source(
        refs=[row.ref for row in table.rows],
        labels=np.array([row.labels for row in table.rows]),
        label_names=table.label_names,
        patient_ids=[row.patient_id for row in table.rows],
        splits=[row.split for row in table.rows],
        load=lambda i: load_image_file(table.rows[i]),
        bit_depth=max(depths),
        description=f"{len(table.rows)} images listed in {table.csv_path.name}",
    )


def _bit_depth(row: CsvRow) -> int:
    """Open the header only (cheap) so a non-image file is refused before any pixel work."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(row.path) as image:
                mode = image.mode
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{row.ref}: not a readable image ({_reason(error, row)})") from None
    return 16 if mode in _SIXTEEN_BIT_MODES else 8


def load_image_file(row: CsvRow) -> np.ndarray:
    """Decode fully (this is where a truncated file fails) to float32 in [0, 1]."""
    try:
        with Image.open(row.path) as image:
            image.load()
            return pil_to_float(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"{row.ref}: cannot decode image ({_reason(error, row)})") from None


def pil_to_float(image: Image.Image) -> np.ndarray:
    """Grey levels to [0, 1] by the image's own depth; colour stays [H, W, 3] for `prepare`."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _reason(error: Exception, row: CsvRow) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not a format Pillow can identify"
    return one_line_reason(error, row)
