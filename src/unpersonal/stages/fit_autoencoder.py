"""`unpersonal fit-autoencoder`: the autoencoder of latent diffusion (`diffusion.space: latent`)."""

from __future__ import annotations

from typing import Any

from unpersonal.data.canonical import load_canonical
from unpersonal.stages import StageTask
from unpersonal.torch_utils import pick_device
from unpersonal.training.autoencoder import publish, train


def build_fit_autoencoder(task: StageTask) -> dict[str, Any]:
    """Train (or resume) and publish; returns autoencoder.json's content."""
    config, run = task.config, task.run
    dataset = load_canonical(task.input("prepare"))
    device = pick_device()
    result = train(config.autoencoder, config.seed, dataset.subset("train"),
                   task.work_dir() / "checkpoint.pt", device, task.name)
    with task.output() as folder:
        meta = publish(folder, result, config.autoencoder, dataset, device)
    run.clear_work(task.name)
    return meta
