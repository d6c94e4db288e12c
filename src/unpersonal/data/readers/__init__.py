"""Readers: one module per input format, each returning a `Source`.

`read_source` picks the reader from `data.format`, or guesses it from what `data.source` is:
an `.npz` file, a CSV (its folder is the dataset folder), or a folder holding DICOM files,
NIfTI volumes or ordinary images beside a label CSV.
"""

from __future__ import annotations

from pathlib import Path

from unpersonal.config import DataConfig
from unpersonal.data.readers.images import IMAGE_SUFFIXES
from unpersonal.data.source import Source
from unpersonal.errors import UserError

_FOLDER_FORMATS = ("images", "dicom", "nifti")


def read_source(config: DataConfig) -> Source:
    path = config.source
    if path is None:
        raise ValueError("read_source needs data.source; phantoms are made by prepare")
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".csv":
        config = config.model_copy(update={"csv": path})
        path = path.parent
    fmt = config.format if config.format != "auto" else guess_format(path)
    if fmt == "npz":
        if not path.is_file():
            raise UserError(f"--data {path}: data.format is npz but this is a folder")
        from unpersonal.data.readers.npz import read_npz
        return read_npz(path)
    if not path.is_dir():
        raise UserError(f"--data {path}: a {fmt} dataset is a folder with a label CSV, "
                        "or the CSV itself")
    if fmt == "dicom":
        from unpersonal.data.readers.dicom import read_dicom_folder
        return read_dicom_folder(path, config)
    if fmt == "nifti":
        from unpersonal.data.readers.nifti import read_nifti_folder
        return read_nifti_folder(path, config)
    from unpersonal.data.readers.images import read_image_folder
    return read_image_folder(path, config)


def guess_format(path: Path) -> str:
    """npz for an .npz file; for a folder, what most of its files are."""
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise UserError(f"--data {path}: not an .npz, a CSV or a folder; set data.format")
    counts = dict.fromkeys(_FOLDER_FORMATS, 0)
    for file in path.rglob("*"):
        name = file.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            counts["nifti"] += 1
        elif name.endswith(".dcm") or (file.is_file() and not file.suffix and _has_dicom_magic(file)):
            counts["dicom"] += 1
        elif name.endswith(IMAGE_SUFFIXES):
            counts["images"] += 1
    best = max(counts, key=counts.__getitem__)
    if counts[best] == 0:
        raise UserError(f"--data {path}: found no images, DICOM files or NIfTI volumes in it")
    return best


def _has_dicom_magic(file: Path) -> bool:
    try:
        with open(file, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False
