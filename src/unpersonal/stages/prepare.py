"""`unpersonal prepare`: any supported dataset -> the run's canonical, patient-safe form."""

from __future__ import annotations

from typing import Any

from unpersonal.data.canonical import save_canonical
from unpersonal.data.prepare import build_canonical
from unpersonal.stages import StageTask


def build_prepare(task: StageTask) -> dict[str, Any]:
    """Read, check, resize and split, then publish; returns dataset.json's content."""
    config = task.config
    data = build_canonical(config.data, config.phantoms, config.seed)
    with task.output() as folder:
        return save_canonical(folder, data)
