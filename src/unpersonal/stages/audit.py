"""`unpersonal audit`: the privacy audit of the released set by the audit's own models, or of any
folder of images (`--release DIR`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from unpersonal.config import Config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.evaluation.audit import AuditModels, audit_set, dcr_plot
from unpersonal.evaluation.external import ExternalRelease, read_release_folder
from unpersonal.evaluation.sets import AUDIT_EMBEDDER, AUDIT_REID, read_synthetic_set
from unpersonal.privacy.floor import AlignedPixels
from unpersonal.report.summary import leak_sensitivity, privacy_verdicts, verdict_table
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages import StageTask, require


def build_audit(task: StageTask) -> dict[str, Any]:
    """Audit the released set; returns privacy.json's content."""
    dataset = load_canonical(task.input("prepare"))
    released = read_synthetic_set(task.input("generate") / "synthetic", dataset.label_names)
    models = load_audit_models(task.config, task.run, dataset)
    figures, distances = audit_set(models, released.images, task.config.audit, task.config.seed)
    with task.output() as folder:
        write_atomic(folder / "privacy.json", json.dumps(figures, indent=2) + "\n")
        write_atomic(folder / "dcr.png", dcr_plot(distances))
    return figures


def load_audit_models(config: Config, run: RunDir, dataset: CanonicalDataset) -> AuditModels:
    """The audit's models of a run, with its settings (the benchmarks audit other sets too)."""
    return AuditModels(run.stage_path(AUDIT_EMBEDDER), run.stage_path(AUDIT_REID), dataset,
                       config.privacy.reid_heldout_quantile, config.audit.reid_neighbours,
                       AlignedPixels.from_settings(config.privacy))


def read_release(config: Config, run: RunDir, release: Path) -> ExternalRelease:
    """A folder of images to audit, at the run's resolution: checked before any model is
    trained, so bad input stops the command at once."""
    require(run, "prepare")
    dataset = load_canonical(run.stage_path("prepare"))
    return read_release_folder(release, dataset.resolution, config.data.fit, dataset.label_names)


def audit_release(config: Config, run: RunDir, released: ExternalRelease, release: Path,
                  out: Path) -> dict[str, Any]:
    """Audit a folder of images (`read_release`) against the run's private data, with the
    figures and verdicts of the run's own audit. Writes privacy.json, dcr.png and AUDIT.md into
    `out`, all at once when the audit is done (a folder built beside it, then renamed)."""
    dataset = load_canonical(run.stage_path("prepare"))
    models = load_audit_models(config, run, dataset)
    figures, distances = audit_set(models, released.images, config.audit, config.seed)
    figures["release"] = {"folder": str(release), "images": len(released.names),
                          "labelled": released.labels is not None, "notes": released.notes}
    if released.labels is not None:
        figures["release"]["label_counts"] = dict(zip(
            dataset.label_names, released.labels.sum(axis=0).astype(int).tolist()))
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_atomic(partial / "privacy.json", json.dumps(figures, indent=2) + "\n")
    write_atomic(partial / "dcr.png", dcr_plot(distances))
    write_atomic(partial / "AUDIT.md", audit_markdown(figures, release))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return figures


def audit_markdown(figures: dict[str, Any], release: Path) -> str:
    """The report section of an audit of a folder: its verdicts and what was read."""
    verdict = "passes every test" if figures["tests"]["passed"] else "FAILS"
    lines = [f"# Privacy audit of {release.name}", "",
             f"{figures['images']:,} images audited against {figures['training_images']:,} "
             f"training images; baseline: {figures['heldout_images']:,} real images of patients "
             f"never trained on (the {figures['heldout_split']} split). The release {verdict} "
             f"(family-wise error {figures['tests']['alpha']:g}, Holm).", "",
             *verdict_table([v.to_json() for v in privacy_verdicts(figures)]), "",
             leak_sensitivity(figures)]
    notes = figures["release"]["notes"]
    if notes:
        lines += ["", "Notes:", "", *(f"* {note}" for note in notes)]
    return "\n".join(lines) + "\n"
