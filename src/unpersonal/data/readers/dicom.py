"""DICOM files with a label CSV: one image per file, or per frame of a multi-frame file.

Pixels become [0, 1] the way a radiologist would see them: the modality LUT (Rescale Slope and
Intercept, e.g. to Hounsfield units), then a window (`data.window`, else the header's first
WindowCenter/WindowWidth, else the image's 0.5-99.5 percentile range), and MONOCHROME1 inverted
so that bone is always bright. Headers are read up front, without pixels, so a wrong file is
refused before any pixel work; pixels are decoded one frame at a time when `prepare` asks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, pixel_array

from unpersonal.config import DataConfig
from unpersonal.data.readers.intensity import to_unit, window_range
from unpersonal.data.readers.table import CsvRow, find_csv, one_line_reason, read_table
from unpersonal.data.source import Source
from unpersonal.errors import UserError

_GREY = ("MONOCHROME1", "MONOCHROME2")
# pydicom hands these out as RGB; they are scaled by their bit depth, not windowed.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
# What the modality LUT and the window read. Enhanced multi-frame files (CT, MR, PET) keep them
# inside these functional-group items instead of at the top level.
_PIXEL_VALUE_KEYWORDS = ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept",
                         "WindowCenter", "WindowWidth")
_FUNCTIONAL_GROUP_ITEMS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
# pydicom raises any of these on a damaged file; they are the file's fault, not a bug here.
_PARSE_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError,
                 IndexError, AttributeError, struct.error)
_DECODE_ERRORS = (*_PARSE_ERRORS, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class _Frame:
    """One `Source` row: where its pixels are and what turns them into [0, 1]."""

    row: CsvRow
    ref: str
    index: int  # frame within the file, from 0
    pixel_values: Dataset  # only the modality LUT and window elements that apply to this frame
    photometric: str
    bits_stored: int


def read_dicom_folder(folder: Path, config: DataConfig) -> Source:
    table = read_table(find_csv(folder, config.csv), folder, config.label_columns)
    frames: list[_Frame] = []
    patient_ids: list[str | None] = []
    for row in table.rows:
        header = _read_header(row)
        file_frames = _frames_of(row, header)
        frames += file_frames
        patient_ids += [_patient_id(row, header)] * len(file_frames)
    window = config.window
    return Source(
        refs=[frame.ref for frame in frames],
        labels=np.array([frame.row.labels for frame in frames]),
        label_names=table.label_names,
        patient_ids=patient_ids,
        splits=[frame.row.split for frame in frames],
        load=lambda i: _load_frame(frames[i], window),
        bit_depth=16 if any(frame.bits_stored > 8 for frame in frames) else 8,
        description=_describe(len(frames), len(table.rows), table.csv_path.name),
    )


def _read_header(row: CsvRow) -> Dataset:
    """Everything but the pixels: cheap, and enough to refuse a file that is not a DICOM image."""
    try:
        header = pydicom.dcmread(row.path, stop_before_pixels=True)
    except InvalidDicomError:
        raise UserError(f"{row.ref}: not a DICOM file (no 'DICM' marker after the 128-byte "
                        "preamble)") from None
    except _PARSE_ERRORS as error:
        reason = one_line_reason(error, row)
        raise UserError(f"{row.ref}: cannot read the DICOM header ({reason})") from None
    if not header.get("Rows") or not header.get("Columns"):
        raise UserError(f"{row.ref}: DICOM file without an image (no Rows/Columns in the header; "
                        "a report or a truncated file?)")
    photometric = str(header.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in _GREY + _COLOUR:
        shown = repr(photometric) if photometric else "missing"
        raise UserError(f"{row.ref}: PhotometricInterpretation {shown} is not supported "
                        "(MONOCHROME1, MONOCHROME2, RGB or YBR)")
    return header


def _patient_id(row: CsvRow, header: Dataset) -> str | None:
    """The header's PatientID, else the CSV's; two different IDs for one file is a data error."""
    in_header = str(header.get("PatientID") or "").strip() or None
    if in_header and row.patient_id and in_header != row.patient_id:
        raise UserError(f"{row.ref}: the CSV's patient_id {row.patient_id!r} disagrees with the "
                        f"DICOM header's PatientID {in_header!r}; fix one of them, or leave the "
                        "CSV's empty to use the header's")
    return in_header or row.patient_id


def _frames_of(row: CsvRow, header: Dataset) -> list[_Frame]:
    count = _frame_count(row, header)
    photometric = str(header.PhotometricInterpretation).strip().upper()
    bits_stored = int(header.get("BitsStored") or header.get("BitsAllocated") or 8)
    if header.get("PerFrameFunctionalGroupsSequence"):
        elements = [_pixel_value_elements(header, index) for index in range(count)]
    else:
        elements = [_pixel_value_elements(header, None)] * count  # one shared, small dataset
    return [_Frame(row=row, ref=_frame_ref(row, index, count), index=index,
                   pixel_values=elements[index], photometric=photometric, bits_stored=bits_stored)
            for index in range(count)]


def _frame_count(row: CsvRow, header: Dataset) -> int:
    """NumberOfFrames, absent or 0 meaning one frame, as pydicom reads it."""
    try:
        count = int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise UserError(f"{row.ref}: NumberOfFrames {header.get('NumberOfFrames')!r} is not a "
                        "whole number") from None
    return max(count, 1)


def _pixel_value_elements(header: Dataset, frame: int | None) -> Dataset:
    """The modality LUT and window elements that apply to one frame, and nothing else.

    Classic files keep them at the top level; enhanced multi-frame files keep them in the shared
    and then the per-frame functional groups, each overriding the one before. Keeping only these
    elements (not whole headers) keeps a large dataset's memory small.
    """
    layers = [header]
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        layers.append(shared[0])
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame is not None and frame < len(per_frame):
        layers.append(per_frame[frame])
    kept = Dataset()
    if hasattr(header, "file_meta"):
        kept.file_meta = header.file_meta  # the byte order of a Modality LUT's OW data
    for layer in layers:
        parts = [layer, *(layer[name][0] for name in _FUNCTIONAL_GROUP_ITEMS if layer.get(name))]
        for part in parts:
            for keyword in _PIXEL_VALUE_KEYWORDS:
                if keyword in part:
                    kept.add(part[keyword])
    return kept


def _frame_ref(row: CsvRow, index: int, count: int) -> str:
    """Frames are counted from 1, as DICOM viewers and the Frame Number attribute do."""
    if count == 1:
        return row.ref
    return row.ref_for(f"frame {index + 1}")


def _load_frame(frame: _Frame, window: tuple[float, float] | None) -> np.ndarray:
    """Decode one frame to float32 [0, 1]: grey [H, W] windowed, colour [H, W, 3] by depth."""
    stored = _decode(frame)
    if frame.photometric in _COLOUR:
        return (stored / float(2 ** frame.bits_stored - 1)).astype(np.float32)
    values = np.asarray(apply_modality_lut(stored, frame.pixel_values), dtype=np.float64)
    low, high = window_range(values, window or _header_window(frame.pixel_values))
    unit = to_unit(values, low, high)
    if frame.photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values bright; make bone bright like MONOCHROME2
    return unit.astype(np.float32)


def _decode(frame: _Frame) -> np.ndarray:
    """Read just this frame from disk: where a truncated or undecodable file is found."""
    try:
        return pixel_array(frame.row.path, index=frame.index)
    except _DECODE_ERRORS as error:
        raise UserError(f"{frame.ref}: cannot decode the DICOM pixel data "
                        f"({one_line_reason(error, frame.row)})") from None


def _header_window(elements: Dataset) -> tuple[float, float] | None:
    """The header's first WindowCenter/WindowWidth pair, if it is a usable one."""
    center = _first_number(elements.get("WindowCenter"))
    width = _first_number(elements.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


def _first_number(value: object) -> float | None:
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _describe(images: int, files: int, csv_name: str) -> str:
    if images == files:
        return f"{images} DICOM images listed in {csv_name}"
    return f"{images} DICOM images (frames of {files} files) listed in {csv_name}"
