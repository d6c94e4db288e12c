"""`unpersonal fit-diffusion`: the diffusion model, on one process or many (accelerate)."""

from __future__ import annotations

from typing import Any

import torch

from unpersonal.artifacts.autoencoder import load_codec
from unpersonal.data.canonical import load_canonical
from unpersonal.stages import StageTask
from unpersonal.training.diffusion import load_training_data, pseudo_source, publish, train


def build_fit_diffusion(task: StageTask) -> dict[str, Any] | None:
    """Train (or resume) and publish; returns model.json's content (None on a process other
    than the main one, which publishes)."""
    from accelerate import Accelerator

    config, run = task.config, task.run
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if task.force and accelerator.is_main_process:
        run.clear_work(task.name)
    accelerator.wait_for_everyone()
    work = (run.work_dir(task.name, task.key) if accelerator.is_main_process
            else run.root / ".work" / task.name)
    accelerator.wait_for_everyone()
    embedder = task.input("fit-embedder") if run.stage_record("fit-embedder") else None
    codec = (load_codec(task.input("fit-autoencoder"), config.diffusion.sigma_data)
             .to(accelerator.device) if config.diffusion.space == "latent" else None)
    data = load_training_data(load_canonical(task.input("prepare")), config.diffusion,
                              pseudo_source(config.diffusion, embedder), codec)
    data.patients_are_images = config.data.no_patient_ids
    result = train(config.diffusion, config.seed, data, work / "checkpoint.pt", accelerator,
                   task.name)
    meta = None
    if accelerator.is_main_process:
        with task.output() as folder:
            meta = publish(folder, result, data, config.diffusion)
        run.clear_work(task.name)
    accelerator.wait_for_everyone()
    return meta
