"""NIfTI volumes (.nii / .nii.gz) with a label CSV; each volume becomes its 2-D slices.

A volume's labels apply to every one of its slices. Volumes are turned to the closest RAS+
orientation (what `nibabel.as_closest_canonical` does), so `data.nifti_axis` means the same body
axis in every file (2 axial, 1 coronal, 0 sagittal), and each slice is rotated to display upright:
anterior up in axial slices, superior up in the others; axial and coronal slices show the patient's
left on the image's left (the neurological convention: a rotation, never a mirror image).
Intensities go to [0, 1] through `data.window` (e.g. Hounsfield units for CT), else the volume's
0.5-99.5 percentile range. NaN and inf voxels are passed through for `prepare` to refuse.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from unpersonal.config import DataConfig
from unpersonal.data.readers.intensity import to_unit, window_range
from unpersonal.data.readers.table import CsvRow, find_csv, one_line_reason, read_table
from unpersonal.data.source import Source
from unpersonal.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# nibabel raises any of these on a damaged or truncated file; they are the file's fault.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


@dataclass(frozen=True)
class _Volume:
    """One CSV row: which of its slices are kept, and the intensities mapped to 0 and 1."""

    row: CsvRow
    slices: list[int]  # indices along the slicing axis, in RAS+ orientation
    low: float
    high: float


def read_nifti_folder(folder: Path, config: DataConfig) -> Source:
    table = read_table(find_csv(folder, config.csv), folder, config.label_columns)
    axis = config.nifti_axis
    volumes = [_scan_volume(row, axis, config.nifti_skip_empty, config.window)
               for row in table.rows]
    slices = [(number, index) for number, volume in enumerate(volumes) for index in volume.slices]
    volume_patients, warnings = _patient_ids(table.rows)
    return Source(
        refs=[_slice_ref(volumes[number].row, index) for number, index in slices],
        labels=np.array([volumes[number].row.labels for number, _ in slices]),
        label_names=table.label_names,
        patient_ids=[volume_patients[number] for number, _ in slices],
        splits=[volumes[number].row.split for number, _ in slices],
        load=_SliceLoader(volumes, slices, axis),
        bit_depth=16,
        warnings=warnings,
        description=f"{len(slices)} slices from {len(volumes)} NIfTI volumes listed in "
                    f"{table.csv_path.name}",
    )


def _scan_volume(row: CsvRow, axis: int, skip_empty: bool,
                 window: tuple[float, float] | None) -> _Volume:
    """Read a volume once up front: refuses a bad file early, finds empty slices and the range."""
    voxels = _read_canonical_volume(row)
    kept = _slices_with_signal(voxels, axis) if skip_empty else np.ones(voxels.shape[axis], bool)
    if not kept.any():
        raise UserError(f"{row.ref}: no slice with signal along axis {axis}: every one of its "
                        f"{voxels.shape[axis]} slices is constant")
    low, high = window_range(voxels, window)
    return _Volume(row, np.flatnonzero(kept).tolist(), low, high)


def _read_canonical_volume(row: CsvRow) -> np.ndarray:
    """The voxels as float32 [X, Y, Z] in the closest RAS+ orientation, or a UserError."""
    if not row.path.name.lower().endswith(NIFTI_SUFFIXES):
        raise UserError(f"{row.ref}: not a .nii or .nii.gz file")
    try:
        image = nib.load(row.path)
    except ImageFileError:
        raise UserError(f"{row.ref}: not a NIfTI file (nibabel cannot identify it)") from None
    except _READ_ERRORS as error:
        reason = one_line_reason(error, row)
        raise UserError(f"{row.ref}: cannot read the NIfTI header ({reason})") from None
    if not isinstance(image, nib.Nifti1Image):  # NIfTI-2 images are a subclass
        raise UserError(f"{row.ref}: not a NIfTI file (nibabel reads it as "
                        f"{type(image).__name__})")
    shape = _volume_shape(row, image.shape)
    orientation = nib.io_orientation(image.affine)
    if np.isnan(orientation).any():
        raise UserError(f"{row.ref}: its affine is degenerate (e.g. all zero), so the body axes "
                        "of the volume are unknown")
    try:
        voxels = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except _READ_ERRORS as error:
        raise UserError(f"{row.ref}: cannot read the voxel data, the file is truncated or damaged "
                        f"({one_line_reason(error, row)})") from None
    return nib.apply_orientation(voxels, orientation)


def _volume_shape(row: CsvRow, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """3-D, allowing trailing length-1 axes ([X, Y, Z, 1] is still one volume)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise UserError(f"{row.ref}: is 4-D {tuple(shape)} (a time series or several channels); "
                        "give one 3-D volume per file, e.g. split it with fslsplit")
    if len(shape) != 3:
        raise UserError(f"{row.ref}: is {len(shape)}-D {tuple(shape)}; the NIfTI reader slices "
                        "3-D volumes")
    if 0 in shape:
        raise UserError(f"{row.ref}: has no voxels (shape {tuple(shape)})")
    return shape[0], shape[1], shape[2]


def _slices_with_signal(voxels: np.ndarray, axis: int) -> np.ndarray:
    """True for each slice that is not constant; a slice with NaN or inf is kept for `prepare`."""
    flat = np.moveaxis(voxels, axis, 0).reshape(voxels.shape[axis], -1)
    constant = np.isfinite(flat).all(axis=1) & (flat.min(axis=1) == flat.max(axis=1))
    return ~constant


class _SliceLoader:
    """`Source.load` for slices: keeps the last windowed volume, as rows come volume by volume."""

    def __init__(self, volumes: list[_Volume], slices: list[tuple[int, int]], axis: int) -> None:
        self._volumes = volumes
        self._slices = slices
        self._axis = axis
        self._cache: tuple[int, np.ndarray] | None = None  # (volume number, windowed voxels)

    def __call__(self, i: int) -> np.ndarray:
        number, index = self._slices[i]
        plane = np.take(self._windowed(number), index, axis=self._axis)
        return np.ascontiguousarray(np.rot90(plane))  # first in-plane axis left-right, second up

    def _windowed(self, number: int) -> np.ndarray:
        """One tuple, read and replaced whole, so concurrent callers never pair the wrong volume."""
        cache = self._cache
        if cache is not None and cache[0] == number:
            return cache[1]
        volume = self._volumes[number]
        windowed = to_unit(_read_canonical_volume(volume.row), volume.low, volume.high)
        self._cache = (number, windowed)
        return windowed


def _patient_ids(rows: list[CsvRow]) -> tuple[list[str], list[str]]:
    """The CSV's patient_id, else the file name: one warning says how many volumes needed that.

    A warning, not a note: with names like sub-01_T1w / sub-01_T2w one patient becomes two, and
    could then land in two splits.
    """
    ids = [row.patient_id or _name_without_suffix(row.path) for row in rows]
    from_names = sum(row.patient_id is None for row in rows)
    if not from_names:
        return ids, []
    warning = (f"patient IDs of {from_names} of {len(rows)} NIfTI volumes are their file names (no "
            "patient_id in the CSV), so each such file counts as its own patient; give "
            "patient_id in the CSV when a patient has several volumes")
    return ids, [warning]


def _name_without_suffix(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _slice_ref(row: CsvRow, index: int) -> str:
    """Slices count from 0 along the reoriented (RAS+) axis, as nibabel and FSLeyes count voxels."""
    return row.ref_for(f"slice {index}")
