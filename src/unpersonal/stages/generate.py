"""`unpersonal generate`: the filtered synthetic set, in blocks that any number of processes
share and a rerun resumes."""

from __future__ import annotations

from typing import Any

import torch

from unpersonal.artifacts.classifier import load_classifier
from unpersonal.data.canonical import load_canonical
from unpersonal.errors import Interrupted
from unpersonal.privacy.filter import FilterPolicy, PrivacyFilter
from unpersonal.sampling.blocks import block_count, block_path, load_block, owned_blocks
from unpersonal.sampling.generate import (CandidateDrawer, Generation, check_settings,
                                          generate_blocks, publish, summarise)
from unpersonal.sampling.judge import CandidateJudge
from unpersonal.sampling.sampler import load_sampler
from unpersonal.sampling.schedule import guidance_at, source_indices
from unpersonal.stages import StageTask


def build_generate(task: StageTask) -> dict[str, Any] | None:
    """Generate every block this process owns, then (main process) publish; returns
    generate.json's content (None on the other processes)."""
    from accelerate import Accelerator

    check_settings(task.config.generate)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:  # one process clears or keys the shared folder
        task.work_dir()
    accelerator.wait_for_everyone()
    work = task.run.root / ".work" / task.name
    generation = assemble(task, accelerator.device)
    n_blocks = block_count(len(generation.order), generation.settings.block_size)
    mine = owned_blocks(n_blocks, accelerator.process_index, accelerator.num_processes)
    try:
        generate_blocks(generation, work, mine, accelerator.is_main_process)
    except KeyboardInterrupt:
        raise Interrupted("generate stopped; finished blocks are kept, rerun the same command "
                          "to resume") from None
    accelerator.wait_for_everyone()
    summary = None
    if accelerator.is_main_process:
        blocks = [load_block(block_path(work, b)) for b in range(n_blocks)]
        summary = summarise(generation, blocks, accelerator.num_processes,
                            accelerator.device.type)
        with task.output() as folder:
            publish(folder, generation.train, blocks, summary)
        task.run.clear_work(task.name)
    accelerator.wait_for_everyone()
    return summary


def assemble(task: StageTask, device: torch.device) -> Generation:
    """The pieces a block is generated from, loaded once per process from the run's stages:
    the sampler (fit-diffusion), the judge (calibrate, fit-embedder, fit-reid, fit-classifier)
    and the training images (prepare)."""
    config = task.config
    dataset = load_canonical(task.input("prepare"))
    train = dataset.subset("train")
    sampler = load_sampler(task.input("fit-diffusion"), train, config.sampling,
                           guidance_at(config.generate, config.sampling, 0,
                                       config.diffusion.conditioning), device,
                           neighbours=(config.generate.pseudo_neighbours
                                       if config.generate.pseudo_condition == "neighbours"
                                       else None))
    privacy_filter = PrivacyFilter.load(task.input("calibrate"), task.input("fit-embedder"),
                                        task.input("fit-reid"), dataset, config.privacy,
                                        config.seed)
    judge = CandidateJudge(privacy_filter, FilterPolicy.from_settings(config.generate),
                           load_classifier(task.input("fit-classifier")), train.label_kind,
                           config.generate.selection, train.bit_depth)
    order = source_indices(config.seed, config.generate.count or len(train), len(train))
    return Generation(config.generate, config.sampling, train, train.images_float(), order,
                      CandidateDrawer(sampler, order, config.seed, config.generate), judge,
                      sampler.conditioner.mode, sampler.meta)
