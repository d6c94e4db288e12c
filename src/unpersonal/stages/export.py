"""`unpersonal export`: the shareable release, written only when every file passes its checks."""

from __future__ import annotations

import json

from unpersonal.data.canonical import load_canonical
from unpersonal.progress import track
from unpersonal.release import METADATA_FILE, export_files, read_names, write_files
from unpersonal.report.card import croissant_json, dataset_card
from unpersonal.report.export import (check_no_identifiers, check_released_images, datasheet,
                                      datasheet_markdown)
from unpersonal.stages import StageTask
from unpersonal.stages.calibrate import load_filter


def build_export(task: StageTask) -> None:
    """Check every file of the release, then write it."""
    dataset = load_canonical(task.input("prepare"))
    source = task.input("generate") / "synthetic"
    names = read_names(source)
    check_released_images(dataset, source, names, task.input("generate") / "decisions.csv",
                          load_filter(task.config, task.run))
    metrics = json.loads((task.input("eval") / "metrics.json").read_text())
    privacy = json.loads((task.input("audit") / "privacy.json").read_text())
    generation = json.loads((task.input("generate") / "generate.json").read_text())
    sheet = datasheet(dataset, len(names), metrics, privacy, generation)
    files = export_files(source, names)
    files["datasheet.json"] = (json.dumps(sheet, indent=2) + "\n").encode()
    files["README.md"] = dataset_card(sheet, datasheet_markdown(sheet)).encode()
    files["croissant.json"] = croissant_json(sheet, files[METADATA_FILE])
    check_no_identifiers(files, dataset)
    with task.output() as folder:
        write_files(folder, track(files.items(), len(files), "export: writing"))
