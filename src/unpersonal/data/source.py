"""What a reader hands to `prepare`: one row per 2-D image, pixels loaded on demand.

Every input format (npz, image folder + CSV, DICOM, NIfTI) becomes a `Source`. Readers only
parse; the checks that protect the privacy story (patient IDs, splits, duplicates, pixel values)
and the resizing live in `prepare`, so every format gets exactly the same treatment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from unpersonal.errors import UserError

SPLITS: tuple[str, ...] = ("train", "val", "test")
LABEL_KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel")


@dataclass
class Source:
    """A dataset as read, before any checks.

    `load(i)` returns image i as float32 in [0, 1] (values outside, NaN or inf are passed through
    for `prepare` to refuse), shaped [H, W] or [H, W, C]. `refs[i]` is how errors name the image:
    a file and CSV row, or an array row.
    """

    refs: list[str]
    labels: np.ndarray  # [N, C] numbers as read; interpreted by `interpret_labels`
    label_names: list[str]
    patient_ids: list[str | None]
    splits: list[str | None]
    load: Callable[[int], np.ndarray]
    bit_depth: int  # 8 or 16: the depth of the input pixels
    notes: list[str] = field(default_factory=list)  # worth knowing, e.g. colour converted to grey
    warnings: list[str] = field(default_factory=list)  # may hurt results, e.g. images upsampled
    description: str = ""

    def __len__(self) -> int:
        return len(self.refs)


def interpret_labels(raw: np.ndarray, names: Sequence[str], kind: str, refs: Sequence[str]
                     ) -> tuple[np.ndarray, list[str], str]:
    """Turn labels as read into uint8 [N, C] indicator vectors and their kind.

    One column of 0/1 is binary; one column of integers 0..K-1 is multi-class (one-hot, one name
    per class); several 0/1 columns are multi-label. `kind` other than "auto" forces the reading.
    """
    values = np.asarray(raw, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise UserError("labels must be one value or one row of values per image")
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UserError(f"{refs[row]}: label {values[row].tolist()} is not a whole number")
    ints = values.astype(np.int64)
    if kind == "auto":
        kind = _guess_kind(ints)
    if kind == "multiclass":
        if ints.shape[1] != 1:
            raise UserError(f"multiclass labels need one column, got {ints.shape[1]}: {list(names)}")
        classes = ints[:, 0]
        if classes.min() < 0:
            row = int(np.argmin(classes))
            raise UserError(f"{refs[row]}: class label {classes[row]} is negative; classes are 0..K-1")
        _check_classes_contiguous(classes, refs)
        count = int(classes.max()) + 1
        names = [f"{names[0] if len(names) == 1 else 'class'}={k}" for k in range(count)]
        return np.eye(count, dtype=np.uint8)[classes], list(names), kind
    outside = (ints < 0) | (ints > 1)
    if outside.any():
        row = int(np.argwhere(outside)[0][0])
        raise UserError(f"{refs[row]}: {kind} labels must be 0 or 1, got {ints[row].tolist()}")
    if kind == "binary" and ints.shape[1] != 1:
        raise UserError(f"binary labels need one column, got {ints.shape[1]}: {list(names)}")
    return ints.astype(np.uint8), list(names), kind


def _check_classes_contiguous(classes: np.ndarray, refs: Sequence[str]) -> None:
    """Refuse a class number that skips classes: K is the largest label + 1, so one stray value
    (1000 among 0/1) would otherwise make a 1,001-class problem of mostly empty classes.

    Names the first row (in data order) whose class lies past the first missing one.
    """
    present = np.unique(classes)  # sorted, non-negative here
    gaps = np.flatnonzero(present != np.arange(len(present)))
    if len(gaps) == 0:
        return
    missing_from = int(gaps[0])  # the smallest class no image has
    missing_to = int(present[gaps[0]]) - 1  # ... up to just below the next class that is used
    row = int(np.flatnonzero(classes > missing_from)[0])
    missing = (f"class {missing_from}" if missing_from == missing_to
               else f"classes {missing_from}..{missing_to}")
    raise UserError(f"{refs[row]}: class label {classes[row]}, but no image has {missing}; "
                    "multi-class labels must be 0..K-1 with every class used")


def _guess_kind(ints: np.ndarray) -> str:
    if ints.shape[1] > 1:
        return "multilabel"
    return "binary" if set(np.unique(ints).tolist()) <= {0, 1} else "multiclass"

