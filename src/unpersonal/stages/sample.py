"""`unpersonal sample`: unfiltered images from the trained model, to look at it (never exported)."""

from __future__ import annotations

import json
from typing import Any

from unpersonal.data.canonical import load_canonical
from unpersonal.rundir import write_atomic, write_npz_atomic
from unpersonal.sampling.draw import draw_samples, grid_png, real_vs_synthetic_grid
from unpersonal.sampling.sampler import load_sampler
from unpersonal.stages import StageTask
from unpersonal.torch_utils import pick_device


def build_sample(task: StageTask) -> dict[str, Any]:
    """Draw `sampling.count` images; returns sampling.json's content."""
    settings = task.config.sampling
    train = load_canonical(task.input("prepare")).subset("train")
    sampler = load_sampler(task.input("fit-diffusion"), train, settings, settings.guidance,
                           pick_device())
    drawn = draw_samples(sampler, task.config.seed, settings.count)
    with task.output() as folder:
        write_npz_atomic(folder / "images.npz", images=drawn.images,
                         labels=train.labels[drawn.source], source=drawn.source)
        write_atomic(folder / "grid.png", grid_png(real_vs_synthetic_grid(train, drawn)))
        write_atomic(folder / "sampling.json", json.dumps(drawn.report, indent=2) + "\n")
    return drawn.report
