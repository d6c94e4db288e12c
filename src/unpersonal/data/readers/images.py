"""A folder of PNG/JPEG/TIFF/BMP images with a label CSV.

One file holds one image: a multi-page TIFF or an animated GIF/PNG is refused rather than read
as its first frame. Images past Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) are
refused too, naming the file.
"""

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
# JPEG files with several frames (MPO: a camera's stereo pair or its embedded previews) hold one
# picture whose first frame is the image itself; every other multi-frame format is refused.
_FIRST_FRAME_IS_THE_IMAGE = ("MPO",)


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
    """Open the header only (cheap) so a non-image, multi-frame or oversized file is refused
    before any pixel work."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(row.path) as image:
                mode = image.mode
                _check_single_frame(image, row)
    except Image.DecompressionBombError as error:
        raise UserError(f"{row.ref}: {_reason(error, row)}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{row.ref}: not a readable image ({_reason(error, row)})") from None
    return 16 if mode in _SIXTEEN_BIT_MODES else 8


def _check_single_frame(image: Image.Image, row: CsvRow) -> None:
    """Refuse a file of several images: which frame is meant is the user's call, not ours."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format not in _FIRST_FRAME_IS_THE_IMAGE:
        raise UserError(f"{row.ref}: holds {frames} frames ({image.format}); one image per file: "
                        "save each frame as its own file and list each in the CSV")


def load_image_file(row: CsvRow) -> np.ndarray:
    """Decode fully (this is where a truncated file fails) to float32 in [0, 1]."""
    try:
        with Image.open(row.path) as image:
            image.load()
            return pil_to_float(image)
    except Image.DecompressionBombError as error:
        raise UserError(f"{row.ref}: {_reason(error, row)}") from None
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
    if isinstance(error, Image.DecompressionBombError):
        # Pillow's text ("Image size (N pixels) exceeds limit of M pixels, could be
        # decompression bomb DOS attack.") keeps its first clause; then what to do about it.
        size = str(error).split(",")[0]
        return (f"{size}, which Pillow refuses as a possible decompression bomb; downsample the "
                "image (prepare resizes it to data.resolution anyway)")
    return one_line_reason(error, row)
