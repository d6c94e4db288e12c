"""`unpersonal prepare`: any supported dataset -> the canonical, patient-safe form.

Everything is read and checked in memory first; only a dataset that passed every check is written
(atomically, through the run directory). The checks are the ones that would silently break the
privacy story later: images without a patient, a patient in two splits, the same image in two
splits, and pixels that are not numbers.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from unpersonal.config import DataConfig, PhantomConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.data.pixels import fit_square, quantize, resize, to_grey
from unpersonal.data.source import SPLITS, Source, interpret_labels
from unpersonal.data.split import (PROBE, check_given_split_filled, check_made_split_filled,
                                   hold_out_identity_probes, patient_groups, split_patients)
from unpersonal.errors import UserError
from unpersonal.progress import track
from unpersonal.rundir import sha256_file, sha256_json

_RANGE_TOLERANCE = 1e-4  # float inputs a hair outside [0, 1] from rounding are fine


def fingerprint(source: Path | None) -> str:
    """What the input is, cheaply: a file's content hash; a folder's names, sizes and mtimes."""
    if source is None:
        return "phantoms"
    if source.is_file():
        return sha256_file(source)
    if not source.is_dir():
        raise UserError(f"--data {source}: no such file or folder")
    listing = [(str(path.relative_to(source)), path.stat().st_size, path.stat().st_mtime_ns)
               for path in sorted(source.rglob("*")) if path.is_file()]
    return sha256_json(listing)


def build_canonical(settings: DataConfig, phantoms: PhantomConfig, seed: int) -> CanonicalDataset:
    """Read, check, resize and split; raises UserError before anything is written."""
    source = _read(settings, phantoms, seed)
    if len(source) == 0:
        raise UserError(f"{settings.source}: the dataset is empty")
    labels, names, kind = interpret_labels(source.labels, source.label_names,
                                           settings.label_kind, source.refs)
    if len(labels) != len(source):
        raise UserError(f"{source.description}: {len(labels)} labels for {len(source)} images")
    patients = _patient_ids(source, settings.no_patient_ids)
    given_split = _given_split(source)
    if given_split is not None:
        check_patients_in_one_split(patients, given_split, source.refs)
        check_given_split_filled(given_split, source.description)
    depth = source.bit_depth if settings.bit_depth == "auto" else int(settings.bit_depth)
    images, digests = _canonical_pixels(source, settings, depth)
    if given_split is not None:
        check_duplicates_across_splits(digests, given_split, source.refs)
        split, split_origin = given_split, "given with the data"
    else:
        groups = patient_groups(patients, digests)
        split = split_patients(groups, labels, settings.split_fractions, seed)
        check_made_split_filled(split, settings.split_fractions, len(groups),
                                source.description)
        split_origin = (f"made by unpersonal: by patient, stratified by label, fractions "
                        f"{list(settings.split_fractions)}, seed {seed}")
    split = hold_out_identity_probes(split, patients, digests, settings.identity_probe_share,
                                     seed)
    _note_duplicates_within_splits(source, digests, patients)
    data = CanonicalDataset(images, labels, patients, split, np.array(source.refs), names, kind,
                            depth)
    data.meta = {"source": source.description, "split": split_origin,
                 "summary": summarize(data), "notes": source.notes,
                 "warnings": source.warnings}
    return data


def _read(settings: DataConfig, phantoms: PhantomConfig, seed: int) -> Source:
    """The data named by `settings.source`, or without one the phantoms."""
    if settings.source is None:
        from unpersonal.data.demo import phantom_source
        return phantom_source(phantoms, settings.resolution, seed)
    from unpersonal.data.readers import read_source
    return read_source(settings)


def _patient_ids(source: Source, no_patient_ids: bool) -> np.ndarray:
    if no_patient_ids:
        if any(pid is not None for pid in source.patient_ids):
            source.notes.append("--no-patient-ids: the patient IDs in the data are ignored and "
                                "each image counts as its own patient")
        return np.array([f"image-{i:07d}" for i in range(len(source))])
    missing = [i for i, pid in enumerate(source.patient_ids) if pid is None]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(source)} images have no patient ID (first: "
            f"{source.refs[missing[0]]}); privacy checks need one per image. Add them, or pass "
            "--no-patient-ids to treat each image as its own patient")
    return np.array(source.patient_ids)


def _given_split(source: Source) -> np.ndarray | None:
    given = [split is not None for split in source.splits]
    if not any(given):
        return None
    if not all(given):
        row = given.index(False)
        raise UserError(f"{source.refs[row]}: no split while other images have one; give every "
                        "image a split or none (unpersonal then splits by patient)")
    return np.array(source.splits)


def check_patients_in_one_split(patients: np.ndarray, split: np.ndarray, refs: list[str]) -> None:
    """Refuse a patient in two splits: evaluation would then test on a training patient."""
    seen: dict[str, tuple[str, int]] = {}
    leaking: dict[str, tuple[int, int]] = {}
    for row, (patient, name) in enumerate(zip(patients.tolist(), split.tolist())):
        first = seen.setdefault(patient, (name, row))
        if first[0] != name and patient not in leaking:
            leaking[patient] = (first[1], row)
    if leaking:
        patient, (a, b) = next(iter(leaking.items()))
        more = f" ({len(leaking) - 1} more patients too)" if len(leaking) > 1 else ""
        raise UserError(f"patient {patient!r} is in two splits: {split[a]} ({refs[a]}) and "
                        f"{split[b]} ({refs[b]}){more}; a patient must be in one split only")


def check_duplicates_across_splits(digests: list[str], split: np.ndarray, refs: list[str]) -> None:
    """Refuse an identical image in two splits, whatever patient IDs it carries."""
    first_row: dict[str, int] = {}
    for row, digest in enumerate(digests):
        other = first_row.setdefault(digest, row)
        if split[other] != split[row]:
            raise UserError(f"the same image is in {split[other]} ({refs[other]}) and "
                            f"{split[row]} ({refs[row]}); remove one copy")


def _note_duplicates_within_splits(source: Source, digests: list[str], patients: np.ndarray) -> None:
    owners: dict[str, set[str]] = {}
    for digest, patient in zip(digests, patients.tolist()):
        owners.setdefault(digest, set()).add(patient)
    shared = sum(1 for who in owners.values() if len(who) > 1)
    repeated = len(digests) - len(owners)
    if repeated:
        source.notes.append(f"{repeated} images are identical copies of another image "
                            f"({shared} of them under two or more patient IDs)")


def _canonical_pixels(source: Source, settings: DataConfig, depth: int
                      ) -> tuple[np.ndarray, list[str]]:
    """Load every image once: check values, grey, square, resize, quantise, hash."""
    resolution = settings.resolution
    out = np.empty((len(source), resolution, resolution), dtype=np.uint8 if depth == 8 else np.uint16)
    digests: list[str] = []
    colour: list[int] = []
    small: list[int] = []
    for row in track(range(len(source)), len(source), "reading images"):
        pixels = _checked(source, row)
        grey, was_colour = to_grey(pixels)
        if was_colour:
            colour.append(row)
        square = fit_square(grey, settings.fit)
        if min(square.shape) < resolution:
            small.append(row)
        out[row] = quantize(resize(square, resolution), depth)
        digests.append(hashlib.sha1(out[row].tobytes()).hexdigest())
    if colour and len(colour) < len(source):
        source.notes.append(f"{len(colour)} colour and {len(source) - len(colour)} grey images: "
                            f"colour converted to grey (first: {source.refs[colour[0]]})")
    elif colour:
        source.notes.append(f"all {len(colour)} images were colour and were converted to grey")
    if small:
        source.warnings.append(f"{len(small)} images are smaller than {resolution} px and "
                            f"were upsampled (first: {source.refs[small[0]]})")
    return out, digests


def _checked(source: Source, row: int) -> np.ndarray:
    pixels = source.load(row)
    if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) == 0:
        raise UserError(f"{source.refs[row]}: image has shape {pixels.shape}, expected 2-D")
    finite = np.isfinite(pixels)
    if not finite.all():
        bad = int((~finite).sum())
        raise UserError(f"{source.refs[row]}: {bad} pixels are NaN or infinite")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise UserError(f"{source.refs[row]}: float pixel values span [{low:g}, {high:g}]; "
                        "expected [0, 1]")
    return pixels


def summarize(data: CanonicalDataset) -> dict[str, Any]:
    """Per split: images, patients, images per patient, label balance; and patients shared."""
    summary: dict[str, Any] = {"splits": {}}
    members: dict[str, set[str]] = {}
    for name in SPLITS:
        keep = data.split == name
        per_patient = Counter(data.patient_id[keep].tolist())
        counts = list(per_patient.values())
        members[name] = set(per_patient)
        summary["splits"][name] = {
            "images": int(keep.sum()),
            "patients": len(per_patient),
            "images_per_patient_mean": round(float(np.mean(counts)), 3) if counts else 0.0,
            "images_per_patient_max": max(counts, default=0),
            "patients_with_2plus_images": sum(1 for c in counts if c > 1),
            "positives": {label: int(data.labels[keep, k].sum())
                          for k, label in enumerate(data.label_names)},
        }
    probes = data.split == PROBE
    summary["identity_probes"] = {"images": int(probes.sum()),
                                  "patients": len(np.unique(data.patient_id[probes]))}
    summary["shared_patients"] = len((members["train"] & members["val"])
                                     | (members["train"] & members["test"])
                                     | (members["val"] & members["test"]))
    return summary

