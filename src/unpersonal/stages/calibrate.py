"""`unpersonal calibrate`: the privacy filter's distance floors and re-ID thresholds."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from unpersonal.artifacts.reid import load_reid
from unpersonal.config import Config
from unpersonal.data.canonical import load_canonical
from unpersonal.privacy.filter import PrivacyFilter, calibrate
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages import StageTask, require


def build_calibrate(task: StageTask) -> dict[str, Any]:
    """Calibrate on the validation patients; returns floors.json's content."""
    dataset = load_canonical(task.input("prepare"))
    features = np.load(task.input("fit-embedder") / "features.npy")
    reid_train, summary = calibrate(dataset, features, load_reid(task.input("fit-reid")),
                                    task.config.privacy, task.config.seed)
    with task.output() as folder:
        np.save(folder / "reid_train.npy", reid_train)
        write_atomic(folder / "floors.json", json.dumps(summary, indent=2) + "\n")
    return summary


def load_filter(config: Config, run: RunDir) -> PrivacyFilter:
    """A run's privacy filter: its calibration, embedder and re-ID network, guarding its
    training images."""
    require(run, "calibrate")
    return PrivacyFilter.load(run.stage_path("calibrate"), run.stage_path("fit-embedder"),
                              run.stage_path("fit-reid"),
                              load_canonical(run.stage_path("prepare")), config.privacy,
                              config.seed)
