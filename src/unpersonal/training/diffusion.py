"""`unpersonal fit-diffusion`: train the EDM2-style denoiser, resumably, on 1..n processes.

One readable loop (nanoGPT style). Every random draw of step t (which images, augmentations,
noise levels, condition dropout) comes from a generator seeded by (seed, t, process rank), so a
resumed run draws exactly what an uninterrupted one would have drawn, with no RNG state to save.

    run/.work/fit-diffusion/checkpoint.pt   resumable state (weights, EMA, Adam, step, log)
    run/fit-diffusion/                      published when training ends:
        ema.safetensors      the EMA weights sampling uses
        guide.safetensors    an early EMA snapshot, the autoguidance guide
        model.json           architecture, conditioning, data layout: enough to rebuild the model
        pseudo_features.npy  the pseudo-condition of every training image (training-split order)
        training_log.csv     step, loss, learning rate, images/s, elapsed seconds

Multi-process (`accelerate launch --num_processes N ...` or torchrun) goes through accelerate:
each process draws its share of the global batch and DDP averages the gradients.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unpersonal.config import Config, DiffusionConfig
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.errors import UserError
from unpersonal.models.conditioning import Conditioner, label_code
from unpersonal.models.edm import Denoiser, EDM2Loss, count_parameters, learning_rate
from unpersonal.models.pixel_pca import PixelPCA
from unpersonal.models.unet import UNet
from unpersonal.progress import LiveBar, console
from unpersonal.torch_utils import batch_indices, step_seed
from unpersonal.training.common import cpu_state, interrupted, load_state, out_of_time, save_state
from unpersonal.rundir import RunDir, sha256_file, sha256_json, write_atomic

STAGE = "fit-diffusion"
LOG_EVERY = 10
LOG_FIELDS = ("step", "loss", "lr", "images_per_s", "elapsed_s")


@dataclass
class TrainingData:
    """The training split as the loop needs it: pixels, condition inputs, nothing else."""

    images: torch.Tensor  # uint8/uint16 [N, 1, R, R] on the CPU; scaled per batch
    max_value: float
    codes: torch.Tensor  # label codes [N, L]
    pseudo: torch.Tensor  # pseudo features [N, D] (empty D when unused)
    pseudo_source: str = "none"  # where they came from (see `pseudo_source`)


def pseudo_source(config: Config, run: RunDir) -> tuple[str, Path | None]:
    """Where the pseudo-conditions come from: the user's file, else the run's embedder (its
    unit-norm features, the space the privacy filter and the audit also measure in), else, in
    a run without one, unit-norm PCA of the training pixels as a stand-in."""
    settings = config.diffusion
    if "pseudo" not in settings.conditioning:
        return "none", None
    if settings.pseudo_features is not None:
        return "file", settings.pseudo_features
    if run.stage_record("fit-embedder") is not None:
        run.require("fit-embedder")
        return "embedder", run.stage_path("fit-embedder") / "features.npy"
    return "pixel PCA", None


def stage_key(config: Config, run: RunDir) -> str:
    inputs: dict[str, Any] = {"prepare": run.require("prepare")}
    kind, path = pseudo_source(config, run)
    if path is not None:
        inputs[f"pseudo_features ({kind})"] = sha256_file(path)
    return sha256_json({"config": config.section_dump(("diffusion",)), "inputs": inputs})


def run_fit_diffusion(config: Config, run: RunDir, force: bool = False) -> bool:
    """Train (or resume, or skip when up to date). Returns False when skipped."""
    from accelerate import Accelerator

    key = stage_key(config, run)
    if run.up_to_date(STAGE, key, force):
        return False
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if force and accelerator.is_main_process:
        run.clear_work(STAGE)
    accelerator.wait_for_everyone()
    work = run.work_dir(STAGE, key) if accelerator.is_main_process else run.root / ".work" / STAGE
    accelerator.wait_for_everyone()
    data = load_training_data(load_canonical(run.stage_path("prepare")), config.diffusion,
                              pseudo_source(config, run))
    result = train(config, data, work / "checkpoint.pt", accelerator)
    if accelerator.is_main_process:
        with run.build_stage(STAGE, key, config) as folder:
            publish(folder, result, data, config)
        run.clear_work(STAGE)
    accelerator.wait_for_everyone()
    return True


def load_training_data(dataset: CanonicalDataset, settings: DiffusionConfig,
                       pseudo: tuple[str, Path | None] = ("pixel PCA", None)) -> TrainingData:
    """The training split; `pseudo` is `pseudo_source`'s answer (ignored without pseudo
    conditioning)."""
    train = dataset.subset("train")
    if len(train) == 0:
        raise UserError("the training split is empty: nothing to train the diffusion model on")
    return TrainingData(
        images=torch.from_numpy(train.images.astype(np.int32)).unsqueeze(1),
        max_value=float((1 << train.bit_depth) - 1),
        codes=torch.from_numpy(label_code(train.labels, train.label_kind)),
        pseudo=torch.from_numpy(_pseudo_features(dataset, train, settings, *pseudo)),
        pseudo_source=pseudo[0] if "pseudo" in settings.conditioning else "none")


def _pseudo_features(dataset: CanonicalDataset, train: CanonicalDataset,
                     settings: DiffusionConfig, kind: str, path: Path | None) -> np.ndarray:
    if "pseudo" not in settings.conditioning:
        return np.zeros((len(train), 0), np.float32)
    if kind == "embedder":  # one row per canonical image: keep the training rows
        return np.load(path)[dataset.split == "train"].astype(np.float32)
    if kind == "file":
        features = np.load(path)
        if features.ndim != 2 or len(features) != len(train):
            raise UserError(f"diffusion.pseudo_features {path}: shape {features.shape}, "
                            f"expected [{len(train)}, D] (one row per training image)")
        norms = np.linalg.norm(features, axis=1, keepdims=True).clip(1e-8)
        return (features / norms).astype(np.float32)
    pixels = train.images_float()
    return PixelPCA(dim=min(settings.pseudo_dim, len(train) - 1)).fit(pixels).transform(pixels)


def build_denoiser(settings: DiffusionConfig, resolution: int, conditioner: Conditioner) -> Denoiser:
    try:
        net = UNet(resolution, 1, conditioner.dim, model_channels=settings.model_channels,
                   channel_mult=settings.channel_mult, num_blocks=settings.num_blocks,
                   attn_resolutions=settings.attn_resolutions, dropout=settings.dropout)
    except ValueError as error:
        raise UserError(f"diffusion model: {error}") from None
    return Denoiser(net, sigma_data=settings.sigma_data)


def conditioner_for(settings: DiffusionConfig, data: TrainingData) -> Conditioner:
    return Conditioner(settings.conditioning, data.codes.shape[1], data.pseudo.shape[1])


@dataclass
class TrainingResult:
    ema: dict[str, torch.Tensor]
    guide: dict[str, torch.Tensor]
    log: list[dict[str, float]]
    steps_done: int
    parameters: int
    conditioner: Conditioner
    world_size: int


def train(config: Config, data: TrainingData, checkpoint: Path, accelerator: Any) -> TrainingResult:
    """The loop. Saves `checkpoint` every `checkpoint_every` steps and on Ctrl-C / SIGTERM."""
    settings = config.diffusion
    world, rank = accelerator.num_processes, accelerator.process_index
    if settings.batch_size % world:
        raise UserError(f"diffusion.batch_size {settings.batch_size} is not divisible by the "
                        f"{world} processes")
    local_batch = settings.batch_size // world
    torch.manual_seed(config.seed)  # the same initial weights in every process
    conditioner = conditioner_for(settings, data)
    denoiser = build_denoiser(settings, data.images.shape[-1], conditioner)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=settings.lr, betas=(0.9, 0.99), eps=1e-8)
    state = load_state(checkpoint)
    if state is not None:
        denoiser.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
    step = state["step"] if state else 0
    log: list[dict[str, float]] = state["log"] if state else []
    guide = state["guide"] if state else None
    elapsed_before = state["elapsed_s"] if state else 0.0
    # Channels-last memory layout: 12-20% more images/s for these convolutions on CPU
    # (benchmarks/diffusion_throughput.py), the same numbers.
    denoiser.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    ema.to(accelerator.device)
    loss_fn = EDM2Loss(settings.p_mean, settings.p_std, settings.sigma_data)
    ema_exponent = _ema_exponent(settings.ema_std)
    guide_step = _guide_step(settings)
    started, window_loss, window_start = time.perf_counter(), [], time.perf_counter()

    def save() -> None:
        if accelerator.is_main_process:
            _save_checkpoint(checkpoint, accelerator.unwrap_model(model), ema, optimizer, step,
                             log, guide, elapsed_before + time.perf_counter() - started)

    if state is not None and accelerator.is_main_process:
        console.print(f"fit-diffusion: resuming at step {step} of {settings.steps}")
    try:
        with LiveBar("training diffusion", settings.steps, start=step, log_every=LOG_EVERY * 10,
                     enabled=accelerator.is_main_process) as bar:
            while step < settings.steps and not out_of_time(settings.max_minutes, elapsed_before, started):
                generator = torch.Generator(accelerator.device).manual_seed(
                    step_seed(config.seed, step, rank))
                indices = batch_indices(config.seed, step, rank, local_batch, world,
                                        len(data.images))
                images = augment(_to_unit_range(data, indices, accelerator.device), settings,
                                 generator).contiguous(memory_format=torch.channels_last)
                cond = conditioner.build(data.codes[indices].to(accelerator.device),
                                         data.pseudo[indices].to(accelerator.device))
                cond = conditioner.drop(cond, settings.cond_dropout, generator)
                lr = learning_rate(step, settings.lr, settings.lr_ref_steps, settings.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = loss_fn(model, images, cond, generator=generator).mean()
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                step += 1
                _update_ema(ema, accelerator.unwrap_model(model), step, ema_exponent)
                if step == guide_step:
                    guide = cpu_state(ema)
                window_loss.append(loss.item())
                if step % LOG_EVERY == 0 or step == settings.steps:
                    now = time.perf_counter()
                    rate = len(window_loss) * settings.batch_size / (now - window_start)
                    log.append({"step": step, "loss": float(np.mean(window_loss)), "lr": lr,
                                "images_per_s": rate,
                                "elapsed_s": elapsed_before + now - started})
                    window_loss, window_start = [], now
                    bar.update(0, loss=log[-1]["loss"], img_s=rate)
                bar.update(1)
                if step % settings.checkpoint_every == 0:
                    save()
    except KeyboardInterrupt:
        save()
        raise interrupted(STAGE, step, settings.steps) from None
    save()
    ema_state = cpu_state(ema)
    return TrainingResult(ema_state, guide or ema_state, log, step,
                          count_parameters(denoiser), conditioner, world)


def _guide_step(settings: DiffusionConfig) -> int:
    """The step after which the EMA is kept as the autoguidance guide."""
    return max(1, round(settings.guide_at * settings.steps))


def _to_unit_range(data: TrainingData, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stored grey levels -> [-1, 1], the range EDM's sigma_data = 0.5 assumes."""
    return data.images[indices].to(device, torch.float32) * (2.0 / data.max_value) - 1.0


def augment(images: torch.Tensor, settings: DiffusionConfig, generator: torch.Generator
            ) -> torch.Tensor:
    """Shifts (edge-replicated, never wrapped), brightness/contrast, optional left-right flips."""
    batch, device = len(images), images.device
    if settings.augment_shift:
        s = settings.augment_shift
        padded = torch.nn.functional.pad(images, (s, s, s, s), mode="replicate")
        offsets = torch.randint(0, 2 * s + 1, (batch, 2), generator=generator, device=device)
        size = images.shape[-1]
        images = torch.stack([padded[i, :, dy:dy + size, dx:dx + size]
                              for i, (dy, dx) in enumerate(offsets.tolist())])
    if settings.augment_intensity:
        a = settings.augment_intensity
        contrast = 1 + a * (2 * torch.rand(batch, 1, 1, 1, generator=generator, device=device) - 1)
        brightness = a * (2 * torch.rand(batch, 1, 1, 1, generator=generator, device=device) - 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean + 2 * brightness).clamp(-1, 1)
    if settings.augment_flip:
        flip = torch.rand(batch, generator=generator, device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def _ema_exponent(std: float) -> float:
    """EDM2's power-function EMA: the exponent whose profile has relative width `std`."""
    tmp = std ** -2
    return float(np.roots([1, 7, 16 - tmp, 12 - tmp]).real.max())


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, exponent: float) -> None:
    """ema <- beta * ema + (1 - beta) * model with beta = (1 - 1/t)^(exponent + 1).

    The power-function profile averages over a fixed share of training whatever its length,
    which suits budgets from a demo's hundreds of steps to a GPU run's hundreds of thousands.
    """
    beta = (1 - 1 / step) ** (exponent + 1)
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current.detach(), 1 - beta)
    for averaged, current in zip(ema.buffers(), model.buffers()):
        averaged.copy_(current)


def _save_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: Any,
                     step: int, log: list, guide: dict | None, elapsed_s: float) -> None:
    save_state(path, {"model": model.state_dict(), "ema": ema.state_dict(),
                      "optimizer": optimizer.state_dict(), "step": step, "log": log,
                      "guide": guide, "elapsed_s": elapsed_s})


def publish(folder: Path, result: TrainingResult, data: TrainingData, config: Config) -> None:
    settings = config.diffusion
    save_file(result.ema, str(folder / "ema.safetensors"))
    save_file(result.guide, str(folder / "guide.safetensors"))
    if result.conditioner.uses_pseudo:
        np.save(folder / "pseudo_features.npy", data.pseudo.numpy())
    meta = {
        "resolution": int(data.images.shape[-1]), "channels": 1,
        "unet": {"model_channels": settings.model_channels,
                 "channel_mult": list(settings.channel_mult), "num_blocks": settings.num_blocks,
                 "attn_resolutions": list(settings.attn_resolutions), "dropout": settings.dropout},
        "sigma_data": settings.sigma_data, "conditioner": result.conditioner.to_json(),
        "pseudo_source": data.pseudo_source if result.conditioner.uses_pseudo else None,
        "steps_planned": settings.steps, "steps_done": result.steps_done,
        "guide_at_step": _guide_step(settings),
        "parameters": result.parameters, "processes": result.world_size,
        "seconds": round(result.log[-1]["elapsed_s"], 1) if result.log else 0.0,
    }
    write_atomic(folder / "model.json", json.dumps(meta, indent=2) + "\n")
    with open(folder / "training_log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(result.log)


def load_denoiser(folder: Path, which: str = "ema") -> tuple[Denoiser, dict[str, Any]]:
    """A published denoiser ("ema" or "guide") in eval mode, with its model.json."""
    meta = json.loads((folder / "model.json").read_text())
    settings = DiffusionConfig(**meta["unet"], sigma_data=meta["sigma_data"])
    conditioner = Conditioner(**meta["conditioner"])
    denoiser = build_denoiser(settings, meta["resolution"], conditioner)
    denoiser.load_state_dict(load_file(str(folder / f"{which}.safetensors")))
    return denoiser.eval().requires_grad_(False), meta

