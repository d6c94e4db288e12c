"""The built-in demo data: phantoms as a `Source` for `prepare`, or as files for `demo-data`.

The phantoms are drawn at the configured resolution, so `prepare` does no resampling on them,
and carry no split: `prepare` makes the patient-level split, as it would for a user's data.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from unpersonal.config import PhantomConfig
from unpersonal.data.phantoms import FINDINGS, PhantomSet, generate_phantoms
from unpersonal.data.source import Source
from unpersonal.errors import UserError


def label_names(findings: int) -> list[str]:
    """The label columns: "finding" for the binary demo, else the kinds of finding."""
    return ["finding"] if findings == 1 else [kind.name for kind in FINDINGS[:findings]]


def _generate(phantoms: PhantomConfig, resolution: int, seed: int) -> PhantomSet:
    try:
        return generate_phantoms(phantoms.n_patients, resolution, seed,
                                 scans_per_patient=phantoms.scans_per_patient,
                                 finding_rate=phantoms.finding_rate,
                                 findings=phantoms.findings)
    except ValueError as error:  # e.g. a resolution too small to draw ribs in
        raise UserError(f"demo phantoms: {error}") from None


def phantom_source(settings: PhantomConfig, resolution: int, seed: int) -> Source:
    made = _generate(settings, resolution, seed)
    return Source(
        refs=[f"phantom row {i}" for i in range(len(made.images))],
        labels=made.label, label_names=label_names(settings.findings),
        patient_ids=made.patient_id.tolist(), splits=[None] * len(made.images),
        load=lambda i: made.images[i].astype(np.float32) / 255.0, bit_depth=8,
        description=(f"{len(made.images)} phantom scans of {settings.n_patients} patients "
                     f"(seed {seed})"),
    )


def write_demo_data(settings: PhantomConfig, resolution: int, seed: int, out: Path,
                    layout: str) -> str:
    """Write phantoms as a user would bring data: one `.npz`, or a PNG folder with `labels.csv`.

    Refuses an `out` that exists (a file or folder the user may still need); builds the file or
    folder beside `out` and renames it in, so `out` appears whole or not at all. A failure
    leaves nothing behind: neither the partial build nor folders made for `out`. Returns what
    was written, for the CLI to print.
    """
    _check_target(out)
    made = _generate(settings, resolution, seed)
    partial = out.with_name(f".{out.name}.partial")
    created: Path | None = None
    finished = False
    try:
        created = _make_parent(out)
        _discard(partial)  # a build left by a killed earlier run
        if layout == "npz":
            _write_npz(made, label_names(settings.findings), partial)
        else:
            _write_png_folder(made, label_names(settings.findings), partial)
        partial.rename(out)
        finished = True
    except OSError as error:
        raise UserError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    finally:
        if not finished:
            _discard(partial)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
    if layout == "npz":
        return f"{len(made.images)} phantom scans in {out}"
    return f"{len(made.images)} phantom PNGs and labels.csv in {out}"


def _check_target(out: Path) -> None:
    """Refuse before any work: an existing `out`, or a path through a file."""
    try:  # looking can fail too: a folder on the way that the user may not enter
        if out.exists() or out.is_symlink():
            kind = "folder" if out.is_dir() else "file"
            raise UserError(f"--out {out}: a {kind} of that name already exists; choose a new "
                            "path or remove it first")
        existing = next(parent for parent in out.parents if parent.exists())  # "." or "/" at worst
    except OSError as error:
        raise UserError(f"--out {out}: cannot look there ({error.strerror or error})") from None
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder")


def _make_parent(out: Path) -> Path | None:
    """Make `out`'s missing folders; returns the topmost one made (to remove on failure)."""
    missing = [parent for parent in out.parents if not parent.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def _discard(path: Path) -> None:
    """Remove a partial build (a file or a folder) if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_npz(made: PhantomSet, names: list[str], path: Path) -> None:
    """images, label, patient_id: the layout of the shared Kermany files; label_names too when
    the label has several columns."""
    buffer = io.BytesIO()
    named = {"label_names": np.asarray(names)} if made.label.ndim == 2 else {}
    np.savez_compressed(buffer, images=made.images, label=made.label, patient_id=made.patient_id,
                        **named)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _write_png_folder(made: PhantomSet, names: list[str], folder: Path) -> None:
    """One PNG per scan under images/, and labels.csv (path, one column per label,
    patient_id)."""
    (folder / "images").mkdir(parents=True)
    lines = [",".join(["path", *names, "patient_id"])]
    labels = made.label.reshape(len(made.label), -1)
    for row, (image, label, patient) in enumerate(zip(made.images, labels, made.patient_id)):
        name = f"images/scan-{row:05d}.png"
        Image.fromarray(image, mode="L").save(folder / name)
        lines.append(",".join([name, *(str(int(value)) for value in label), patient]))
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
