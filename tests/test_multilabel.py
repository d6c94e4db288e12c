"""Multi-label data end to end: phantoms with several findings, written as a PNG folder with a
CSV as a user would bring it, through every stage of `unpersonal run`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import GENERATE_SETTINGS
from unpersonal.data.phantoms import generate_phantoms

NAMES = ["opacity", "nodule", "effusion"]


def test_several_findings_give_independent_labels_and_keep_the_binary_set() -> None:
    binary = generate_phantoms(20, 32, seed=2)
    several = generate_phantoms(20, 32, seed=2, findings=3)
    assert several.label.shape == (len(several.images), 3)
    assert np.array_equal(several.label[:, 0], binary.label)  # the first kind is the finding
    assert np.array_equal(several.label.any(axis=1), several.label.sum(axis=1) > 0)
    assert len({tuple(row) for row in several.label}) > 2  # combinations, not one label
    no_other = several.label[:, 1:].sum(axis=1) == 0
    assert np.array_equal(several.images[no_other], binary.images[no_other])
    with pytest.raises(ValueError, match="findings"):
        generate_phantoms(2, 32, seed=2, findings=5)


def test_run_on_a_multilabel_png_folder_reports_every_label(cli, tmp_path: Path) -> None:
    folder, run = tmp_path / "xrays", tmp_path / "run"
    settings = [*GENERATE_SETTINGS, "--set", "phantoms.n_patients=40",
                "--set", "phantoms.findings=3", "--set", "phantoms.finding_rate=0.5",
                "--set", "evaluate.restoration=false"]
    made = cli("demo-data", "--out", folder, "--layout", "folder", *settings)
    assert made.code == 0, made.stderr
    with open(folder / "labels.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["path", *NAMES, "patient_id"]

    result = cli("run", "--out", run, "--data", folder, *settings)
    assert result.code == 0, result.stderr
    dataset = json.loads((run / "prepare" / "dataset.json").read_text())
    assert dataset["label_kind"] == "multilabel" and dataset["label_names"] == NAMES
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    classification = metrics["utility"]["classification"]
    for trained_on in ("real", "synthetic"):
        assert list(classification[trained_on]["per_class"]) == NAMES
    page = (run / "report" / "index.html").read_text()
    assert "Test ROC-AUC per label" in page and "images, per label</h2>" in page
    for name in (*NAMES, "no label"):
        assert f"<b>{name}</b>: real training images" in page
    with open(run / "export" / "metadata.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["file_name", *NAMES]
