"""`unpersonal audit`: the privacy audit of the released set by the audit's own models."""

from __future__ import annotations

import json
from typing import Any

from unpersonal.config import Config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.evaluation.audit import AuditModels, audit_set, dcr_plot
from unpersonal.evaluation.sets import AUDIT_EMBEDDER, AUDIT_REID, read_synthetic_set
from unpersonal.privacy.floor import AlignedPixels
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages import StageTask


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
