"""`unpersonal fit-reid` (and the audit's own network): patient re-identification."""

from __future__ import annotations

from typing import Any

from unpersonal.data.canonical import load_canonical
from unpersonal.errors import UserError
from unpersonal.stages import StageTask
from unpersonal.torch_utils import pick_device
from unpersonal.training.reid import held_out_pairs, publish, train, training_data


def build_fit_reid(task: StageTask) -> dict[str, Any]:
    """Train (or resume) and publish; returns reid.json's content.

    The audit's own network (stage audit-reid) is built here too, from its derived config."""
    config = task.config
    dataset = load_canonical(task.input("prepare"))
    no_ids = config.data.no_patient_ids
    data = training_data(dataset.subset("train"), no_ids)
    pairs = {split: held_out_pairs(dataset.subset(split), no_ids, config.seed, split)
             for split in ("val", "test")}
    if pairs["val"].same.sum() == 0 or (~pairs["val"].same).sum() == 0:
        raise UserError("the validation split has no two images of one patient (or only one "
                        "patient): the re-ID network cannot be validated or calibrated; use more "
                        "data, larger data.split_fractions for val, or --no-patient-ids")
    device = pick_device()
    result = train(config.reid, config.seed, data, pairs["val"], task.work_dir() / "checkpoint.pt",
                   device, task.name)
    with task.output() as folder:
        meta = publish(folder, result, pairs, config.reid, config.seed, data, device)
    task.run.clear_work(task.name)
    return meta
