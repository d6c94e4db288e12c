"""NumPy `.npz` datasets, in the two layouts users have.

* flat: `images` [N, H, W(, C)], `label` or `labels` [N(, C)], optional `patient_id` [N] and
  `split` [N] (the layout of the shared Kermany files and of `unpersonal demo-data`);
* MedMNIST: `train_images`, `train_labels`, `val_*`, `test_*`, optional `{split}_patient_id`.

Integer images are scaled by their dtype's range; float images must already be in [0, 1].
Labels must be numbers (text such as "0" is read as its number); a NaN patient ID or split, the
way pandas marks a missing value in a float column, counts as missing.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from unpersonal.data.source import SPLITS, Source
from unpersonal.errors import UserError


def read_npz(path: Path) -> Source:
    arrays = _load_all(path)
    if "images" in arrays:
        return _flat(path, arrays)
    if any(f"{split}_images" in arrays for split in SPLITS):
        return _medmnist(path, arrays)
    raise UserError(f"{path.name}: no 'images' array and no MedMNIST 'train_images' "
                    f"(keys: {', '.join(sorted(arrays)) or 'none'})")


# How a zip archive starts: a file entry, or the end record of an empty archive.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _load_all(path: Path) -> dict[str, np.ndarray]:
    try:  # our own handle: np.load leaves its file open when the zip is truncated
        with open(path, "rb") as handle:
            _check_zip_magic(path, handle.read(8))
            handle.seek(0)
            with np.load(handle, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise UserError(f"{path.name}: not a readable .npz file ({error})") from None
    except ValueError as error:
        raise UserError(f"{path.name}: holds Python objects, which are not loaded for safety "
                        f"({error}); save plain arrays") from None


def _check_zip_magic(path: Path, head: bytes) -> None:
    """Refuse what is not a zip archive before np.load sees it.

    np.load treats any file that is neither .npy nor zip as a pickle, so a text file or an image
    renamed to .npz would otherwise be reported as holding Python objects. A truncated archive
    still starts like a zip and is left to np.load, which names what is wrong with it.
    """
    if head.startswith(_ZIP_MAGIC):
        return
    if head.startswith(_NPY_MAGIC):
        raise UserError(f"{path.name}: a single .npy array, not an .npz archive; save the arrays "
                        "together with numpy.savez(file, images=..., label=..., patient_id=...)")
    raise UserError(f"{path.name}: not a valid .npz file (an .npz is a zip archive of arrays, as "
                    "numpy.savez writes it; this file does not start like one)")


def _flat(path: Path, arrays: dict[str, np.ndarray]) -> Source:
    images = arrays["images"]
    label_key = "label" if "label" in arrays else "labels" if "labels" in arrays else None
    if label_key is None:
        raise UserError(f"{path.name}: no 'label' array beside 'images'")
    labels = arrays[label_key]
    _check_image_array(path, "images", images)
    _check_numeric_labels(path, label_key, labels, path.name)
    _same_length(path, {"images": images, label_key: labels,
                        **{key: arrays[key] for key in ("patient_id", "split") if key in arrays}})
    count = len(images)
    patients = _strings(arrays.get("patient_id"), count)
    splits = _split_values(path, arrays.get("split"), count)
    return _source(path, images, labels, _label_names(arrays, label_key, labels), patients, splits,
                   [f"{path.name} row {i}" for i in range(count)])


def _medmnist(path: Path, arrays: dict[str, np.ndarray]) -> Source:
    present = [split for split in SPLITS if f"{split}_images" in arrays]
    parts: dict[str, list[np.ndarray]] = {"images": [], "labels": []}
    patients: list[str | None] = []
    splits: list[str | None] = []
    refs: list[str] = []
    for split in present:
        images = arrays[f"{split}_images"]
        if f"{split}_labels" not in arrays:
            raise UserError(f"{path.name}: '{split}_images' has no '{split}_labels' beside it")
        labels = arrays[f"{split}_labels"]
        _check_image_array(path, f"{split}_images", images)
        _check_numeric_labels(path, f"{split}_labels", labels, f"{path.name} {split}")
        pid_key = next((k for k in (f"{split}_patient_id", f"{split}_patient_ids") if k in arrays), None)
        _same_length(path, {f"{split}_images": images, f"{split}_labels": labels,
                            **({pid_key: arrays[pid_key]} if pid_key else {})})
        parts["images"].append(images)
        parts["labels"].append(labels.reshape(len(labels), -1))
        patients += _strings(arrays.get(pid_key) if pid_key else None, len(images))
        splits += [split] * len(images)
        refs += [f"{path.name} {split} row {i}" for i in range(len(images))]
    shapes = {part.shape[1:] for part in parts["images"]}
    if len(shapes) > 1:
        raise UserError(f"{path.name}: the splits' images have different shapes {sorted(shapes)}")
    images = np.concatenate(parts["images"])
    labels = np.concatenate(parts["labels"])
    return _source(path, images, labels, _label_names(arrays, "labels", labels), patients, splits, refs)


def _source(path: Path, images: np.ndarray, labels: np.ndarray, names: list[str],
            patients: list[str | None], splits: list[str | None], refs: list[str]) -> Source:
    if len(images) == 0:
        raise UserError(f"{path.name}: holds no images, the dataset is empty")
    scale, depth = _pixel_scale(path, images)
    return Source(
        refs=refs, labels=labels, label_names=names, patient_ids=patients, splits=splits,
        load=lambda i: images[i].astype(np.float32) / scale,
        bit_depth=depth, description=f"{len(images)} images from {path.name}",
    )


def _pixel_scale(path: Path, images: np.ndarray) -> tuple[float, int]:
    if images.dtype == np.uint8:
        return 255.0, 8
    if images.dtype == np.uint16:
        return 65535.0, 16
    if np.issubdtype(images.dtype, np.floating):
        return 1.0, 16
    raise UserError(f"{path.name}: images are {images.dtype}; use uint8, uint16 or float in [0, 1]")


def _check_image_array(path: Path, key: str, images: np.ndarray) -> None:
    """Checked before the lengths: a flattened image array would pass as a count mismatch."""
    if images.ndim not in (3, 4):
        raise UserError(f"{path.name}: array {key!r} has shape {images.shape}; images must be "
                        "[N, H, W] (or [N, H, W, C])")


def _check_numeric_labels(path: Path, key: str, labels: np.ndarray, rows_of: str) -> None:
    """Labels are numbers; text that reads as one ("0", "1") is accepted as that number.

    Class names ("normal", "pneumonia") are refused rather than numbered here: which name is
    class 0 would be a guess, and the label columns' meaning must be the user's. `rows_of`
    starts the name of a row in errors, as the refs do ("d.npz", "d.npz train").
    """
    kind = labels.dtype.kind
    if kind in "biuf":  # bool, signed, unsigned, float
        return
    if kind not in "US" or labels.ndim == 0:  # "U"/"S": unicode or byte strings
        raise UserError(f"{path.name}: array {key!r} holds {labels.dtype} values; labels must be "
                        "numbers: 0/1, or 0..K-1 for K classes")
    for row, values in enumerate(labels.reshape(len(labels), -1).tolist()):
        for value in values:
            try:
                float(value)
            except ValueError:
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                raise UserError(f"{rows_of} row {row}: array {key!r} holds the text {text!r}; "
                                "labels must be numbers: 0/1, or 0..K-1 for K classes (map each "
                                "class name to a number)") from None


def _same_length(path: Path, arrays: dict[str, np.ndarray]) -> None:
    scalars = [key for key, value in arrays.items() if value.ndim == 0]
    if scalars:
        raise UserError(f"{path.name}: array {scalars[0]!r} is a single value; it needs one "
                        "value per image")
    lengths = {key: len(value) for key, value in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{key}: {length}" for key, length in lengths.items())
        raise UserError(f"{path.name}: arrays disagree on the number of images ({listed})")


def _strings(values: np.ndarray | None, count: int) -> list[str | None]:
    if values is None:
        return [None] * count
    return [_text(value) for value in values.tolist()]


def _text(value: object) -> str | None:
    """One ID or split as text; blank, or NaN in a float array (pandas' missing value), is None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value).strip() or None


def _split_values(path: Path, values: np.ndarray | None, count: int) -> list[str | None]:
    splits = _strings(values, count)
    for row, split in enumerate(splits):
        if split is not None and split not in SPLITS:
            raise UserError(f"{path.name} row {row}: split {split!r} is not train, val or test")
    return splits


def _label_names(arrays: dict[str, np.ndarray], key: str, labels: np.ndarray) -> list[str]:
    if "label_names" in arrays and arrays["label_names"].ndim == 1:
        return [str(name) for name in arrays["label_names"].tolist()]
    columns = 1 if labels.ndim == 1 else labels.shape[1]
    return ["label"] if columns == 1 else [f"label_{k}" for k in range(columns)]
