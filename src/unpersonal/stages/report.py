"""`unpersonal report`: the steward's page, from what the earlier stages published."""

from __future__ import annotations

import json

from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.sets import AUDIT_EMBEDDER, read_synthetic_set
from unpersonal.report.html import ReportInputs, render
from unpersonal.rundir import write_atomic
from unpersonal.stages import StageTask


def build_report(task: StageTask) -> None:
    """Render the page and publish it."""
    dataset = load_canonical(task.input("prepare"))
    page = render(ReportInputs(
        title=task.run.root.name, dataset=dataset,
        released=read_synthetic_set(task.input("generate") / "synthetic", dataset.label_names),
        metrics=json.loads((task.input("eval") / "metrics.json").read_text()),
        privacy=json.loads((task.input("audit") / "privacy.json").read_text()),
        generation=json.loads((task.input("generate") / "generate.json").read_text()),
        dcr_png=task.input("audit") / "dcr.png", roc_png=task.input("eval") / "roc.png",
        embedder=task.input(AUDIT_EMBEDDER), seed=task.config.seed,
        config_yaml=task.config.to_yaml()))
    with task.output() as folder:
        write_atomic(folder / "index.html", page)
