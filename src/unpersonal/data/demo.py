"""The built-in demo data: phantoms as a `Source` for `prepare`, or as files for `demo-data`.

The phantoms are drawn at the configured resolution, so `prepare` does no resampling on them,
and carry no split: `prepare` makes the patient-level split, as it would for a user's data.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from unpersonal.config import Config, PhantomConfig
from unpersonal.data.phantoms import PhantomSet, generate_phantoms
from unpersonal.data.source import Source
from unpersonal.errors import UserError
from unpersonal.rundir import write_atomic

LABEL_NAMES = ["finding"]


def _generate(phantoms: PhantomConfig, resolution: int, seed: int) -> PhantomSet:
    try:
        return generate_phantoms(phantoms.n_patients, resolution, seed,
                                 scans_per_patient=phantoms.scans_per_patient,
                                 finding_rate=phantoms.finding_rate)
    except ValueError as error:  # e.g. a resolution too small to draw ribs in
        raise UserError(f"demo phantoms: {error}") from None


def phantom_source(config: Config) -> Source:
    made = _generate(config.phantoms, config.data.resolution, config.seed)
    return Source(
        refs=[f"phantom row {i}" for i in range(len(made.images))],
        labels=made.label, label_names=list(LABEL_NAMES),
        patient_ids=made.patient_id.tolist(), splits=[None] * len(made.images),
        load=lambda i: made.images[i].astype(np.float32) / 255.0, bit_depth=8,
        description=(f"{len(made.images)} phantom scans of {config.phantoms.n_patients} patients "
                     f"(seed {config.seed})"),
    )


def write_demo_data(config: Config, out: Path, layout: str) -> str:
    """Write phantoms as a user would bring data: one `.npz`, or a PNG folder with `labels.csv`.

    Returns what was written, for the CLI to print.
    """
    made = _generate(config.phantoms, config.data.resolution, config.seed)
    if layout == "npz":
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=made.images, label=made.label,
                            patient_id=made.patient_id)
        write_atomic(out, buffer.getvalue())
        return f"{len(made.images)} phantom scans in {out}"
    _write_png_folder(made, out)
    return f"{len(made.images)} phantom PNGs and labels.csv in {out}"


def _write_png_folder(made: PhantomSet, out: Path) -> None:
    """Build the folder beside its final place and rename it in, so it appears whole."""
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    lines = ["path,finding,patient_id"]
    for row, (image, label, patient) in enumerate(zip(made.images, made.label, made.patient_id)):
        name = f"images/scan-{row:05d}.png"
        Image.fromarray(image, mode="L").save(partial / name)
        lines.append(f"{name},{int(label)},{patient}")
    (partial / "labels.csv").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
