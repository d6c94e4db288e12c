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
        autoencoder.*        in latent space (`diffusion.space: latent`): fit-autoencoder's
                             model, copied so that the denoiser carries the decoder it was
                             trained for

In latent space the training images are encoded once, before the loop, to their scaled
posterior means (`LatentCodec.encode`), and the denoiser learns those; pixel shifts and
brightness changes do not apply to latents (flips, when asked for, do).

Multi-process (`accelerate launch --num_processes N ...` or torchrun) goes through accelerate:
each process draws its share of the global batch and DDP averages the gradients.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from unpersonal.artifacts import autoencoder as autoencoder_files
from unpersonal.artifacts.autoencoder import LatentCodec
from unpersonal.artifacts.denoiser import build_denoiser, initial_weights
from unpersonal.config import DiffusionConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError
from unpersonal.models.conditioning import Conditioner, label_code
from unpersonal.models.edm import EDM2Loss, count_parameters, learning_rate
from unpersonal.models.pixel_pca import PixelPCA
from unpersonal.models.unet import renormalize_weights
from unpersonal.rundir import write_atomic
from unpersonal.training.autoencoder import encode_means
from unpersonal.torch_utils import step_generator
from unpersonal.training import private
from unpersonal.training.common import cpu_state, descend
from unpersonal.training.loop import SeededBatches, Snapshot, TrainingLoop, write_log
from unpersonal.training.views import shift_and_jitter

LOG_FIELDS = ("step", "loss", "lr", "images_per_s", "elapsed_s")


@dataclass
class TrainingData:
    """The training split as the loop needs it: pixels, condition inputs, nothing else."""

    images: torch.Tensor
    """Pixel space: stored grey levels [N, 1, R, R] (uint8/int32), scaled per batch. Latent
    space: the scaled latents [N, C, r, r] (float32). On the CPU."""
    max_value: float  # the stored images' top grey level
    resolution: int  # of the images (not the latents)
    codes: torch.Tensor  # label codes [N, L]
    pseudo: torch.Tensor  # pseudo features [N, D] (empty D when unused)
    pseudo_source: str = "none"  # where they came from (see `pseudo_source`)
    codec: LatentCodec | None = None  # the autoencoder, in latent space
    patients: np.ndarray | None = None  # the patient of each row [N] (differential privacy's unit)
    patients_are_images: bool = False  # the data had no patient IDs: each image its own patient


def pseudo_source(settings: DiffusionConfig, embedder: Path | None) -> tuple[str, Path | None]:
    """Where the pseudo-conditions come from: the user's file, else the run's embedder (its
    unit-norm features, the space the privacy filter and the audit also measure in; `embedder`
    is its folder when the run has one), else unit-norm PCA of the training pixels as a
    stand-in."""
    if "pseudo" not in settings.conditioning:
        return "none", None
    if settings.pseudo_features is not None:
        return "file", settings.pseudo_features
    if embedder is not None:
        return "embedder", embedder / "features.npy"
    return "pixel PCA", None


def load_training_data(dataset: CanonicalDataset, settings: DiffusionConfig,
                       pseudo: tuple[str, Path | None] = ("pixel PCA", None),
                       codec: LatentCodec | None = None) -> TrainingData:
    """The training split; `pseudo` is `pseudo_source`'s answer (ignored without pseudo
    conditioning); with `codec` (latent space) the images are encoded to latents."""
    train = dataset.subset("train")
    if len(train) == 0:
        raise UserError("the training split is empty: nothing to train the diffusion model on")
    if codec is None:
        images = torch.from_numpy(train.images.astype(np.int32)).unsqueeze(1)
    elif codec.meta["resolution"] != train.resolution:
        raise UserError(f"the autoencoder was trained at {codec.meta['resolution']} px but "
                        f"the prepared data is {train.resolution} px; rerun fit-autoencoder")
    else:
        images = codec.standardise(encode_means(codec.network, train, codec.mean.device))
    return TrainingData(
        images=images, max_value=float((1 << train.bit_depth) - 1), resolution=train.resolution,
        codes=torch.from_numpy(label_code(train.labels, train.label_kind)),
        pseudo=torch.from_numpy(_pseudo_features(dataset, train, settings, *pseudo)),
        pseudo_source=pseudo[0] if "pseudo" in settings.conditioning else "none", codec=codec,
        patients=train.patient_id)


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
    privacy: dict[str, Any] | None = None  # the accountant's figures (`PrivacyPlan.to_json`)
    init: dict[str, Any] | None = None  # where the starting weights came from (`initial_weights`)


def train(settings: DiffusionConfig, seed: int, data: TrainingData, checkpoint: Path,
          accelerator: Any, stage: str) -> TrainingResult:
    """The loop. Saves `checkpoint` every `checkpoint_every` steps and on Ctrl-C / SIGTERM;
    `stage` is the name messages give it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if settings.batch_size % world:
        raise UserError(f"diffusion.batch_size {settings.batch_size} is not divisible by the "
                        f"{world} processes")
    torch.manual_seed(seed)  # the same initial weights in every process
    conditioner = conditioner_for(settings, data)
    denoiser = build_denoiser(settings, data.images.shape[-1], conditioner, data.images.shape[1])
    init = None
    if settings.init is not None:
        init = initial_weights(denoiser, settings.init)
        if settings.privacy is not None:
            init["patients_checked"] = private.check_init_never_saw(settings.init, data.patients)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    guide = Snapshot()  # the EMA after `guide_at` of training: the autoguidance guide
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=settings.lr, betas=(0.9, 0.99), eps=1e-8)
    loop = TrainingLoop(stage, checkpoint, settings.steps,
                        checkpoint_every=settings.checkpoint_every,
                        max_minutes=settings.max_minutes, images_per_step=settings.batch_size,
                        main_process=accelerator.is_main_process)
    loss_fn = EDM2Loss(settings.p_mean, settings.p_std, settings.sigma_data)
    private_steps = (PrivateSteps(settings, data, conditioner, loss_fn, seed, accelerator, denoiser)
                     if settings.privacy is not None else None)
    parts: dict[str, Any] = {"privacy": private_steps} if private_steps is not None else {}
    loop.resume(model=denoiser, ema=ema, optimizer=optimizer, guide=guide, **parts)
    # Channels-last memory layout: 12-20% more images/s for these convolutions on CPU
    # (benchmarks/diffusion_throughput.py), the same numbers.
    denoiser.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    ema.to(accelerator.device)
    ema_exponent = _ema_exponent(settings.ema_std)
    guide_step = _guide_step(settings)
    batches = SeededBatches(seed, len(data.images), settings.batch_size // world,
                            accelerator.device, rank, world)
    with loop.running("training diffusion"):
        for step in loop.steps():
            lr = learning_rate(step, settings.lr, settings.lr_ref_steps, settings.warmup_steps)
            if private_steps is None:
                indices, generator = batches.draw(step)
                images = _augmented(data, indices, settings, generator, accelerator.device)
                images = images.contiguous(memory_format=torch.channels_last)
                cond = conditioner.build(data.codes[indices].to(accelerator.device),
                                         data.pseudo[indices].to(accelerator.device))
                cond = conditioner.drop(cond, settings.cond_dropout, generator)
                loss = loss_fn(model, images, cond, generator=generator).mean()
                descend(optimizer, loss, lr, accelerator.backward)
                loss = loss.item()
            else:
                loss = private_steps.descend(accelerator.unwrap_model(model), optimizer, step, lr)
            _update_ema(ema, accelerator.unwrap_model(model), step + 1, ema_exponent)
            if step + 1 == guide_step:
                guide.take(ema)
            if loss is not None:  # a private step may sample no patient of this process
                loop.record(loss, lr=lr)
    if private_steps is not None:
        private_steps.check_processes_agree(accelerator.unwrap_model(model))
    ema_state = cpu_state(ema)
    return TrainingResult(ema_state, guide.weights or ema_state, loop.log, loop.step,
                          count_parameters(denoiser), conditioner, world,
                          private_steps.figures(loop.step) if private_steps is not None else None,
                          init)


class PrivateSteps:
    """The step of patient-level DP-SGD (`training.private`): sample patients, one clipped
    gradient each, sum over processes, add the calibrated noise, descend.

    A checkpoint part: it keeps the training's secret (the seed of the sampling and the noise)
    and the noise multiplier it calibrated, so that a resumed training goes on with both."""

    def __init__(self, settings: DiffusionConfig, data: TrainingData, conditioner: Conditioner,
                 loss_fn: EDM2Loss, seed: int, accelerator: Any, net: torch.nn.Module) -> None:
        from accelerate.utils import broadcast_object_list

        privacy = settings.privacy
        assert privacy is not None and data.patients is not None
        private.check_layers(net)
        if getattr(accelerator, "mixed_precision", "no") != "no":
            raise UserError("diffusion.privacy: train in float32 (accelerate's mixed precision "
                            "would rescale the private gradient and skip steps)")
        self.settings, self.data, self.conditioner, self.loss_fn = settings, data, conditioner, loss_fn
        self.seed, self.accelerator = seed, accelerator
        self.unit = "image" if data.patients_are_images else "patient"
        self.plan = private.plan(privacy, len(np.unique(data.patients)), settings.batch_size,
                                 settings.steps)
        self.secret = broadcast_object_list([private.new_secret()])[0]
        self.sampler = self._sampler()

    def _sampler(self) -> private.PatientSampler:
        return private.PatientSampler(
            self.data.patients, self.plan.sample_rate, self.settings.privacy.images_per_patient,
            self.secret, self.accelerator.process_index, self.accelerator.num_processes)

    def state_dict(self) -> dict[str, Any]:
        return {"secret": str(self.secret), "noise_multiplier": self.plan.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["noise_multiplier"] != self.plan.noise_multiplier:
            raise UserError(f"fit-diffusion: this training started with noise multiplier "
                            f"{state['noise_multiplier']} and the accountant now calibrates "
                            f"{self.plan.noise_multiplier} (another Opacus?); rerun with --force "
                            "to train again from the start")
        self.secret = int(state["secret"])
        self.sampler = self._sampler()

    def figures(self, steps_done: int) -> dict[str, Any]:
        """model.json's "privacy": the accountant's figures after the steps taken."""
        return self.plan.to_json(steps_done, self.unit)

    def descend(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                lr: float) -> float | None:
        """One private step; the mean loss of this process's patients (None without any)."""
        rows = self.sampler.draw(step)
        net.eval()  # gradients through torch.func: no in-place weight renormalisation inside
        renormalize_weights(net)  # ... so it is done here, as a forward in training mode would
        summed, losses = self._clipped_sum(net, rows, step)
        if self.accelerator.num_processes > 1:
            summed = {name: self.accelerator.reduce(value, "sum") for name, value in summed.items()}
        noisy = private.add_noise(summed, self.plan, self.secret, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, parameter in net.named_parameters():
            parameter.grad = noisy[name]
        optimizer.step()
        return float(losses.mean()) if len(losses) else None

    def check_processes_agree(self, net: torch.nn.Module) -> None:
        """Every process must end with the same weights: each applies the same reduced sum and
        the same noise, with no DDP in between to repair a difference."""
        if self.accelerator.num_processes == 1:
            return
        total = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum()
        totals = self.accelerator.gather(total.reshape(1).to(self.accelerator.device))
        if not bool((totals == totals[0]).all()):
            raise RuntimeError(f"private training: the processes' weights differ ({totals.tolist()})")

    def _clipped_sum(self, net: torch.nn.Module, rows: np.ndarray, step: int
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if len(rows) == 0:  # no patient of this process in the step
            return {name: torch.zeros_like(p) for name, p in net.named_parameters()}, torch.zeros(0)
        device = self.accelerator.device
        repeats = self.settings.privacy.noise_levels
        flat = torch.from_numpy(rows.reshape(-1)).repeat_interleave(repeats)
        generator = step_generator(self.seed, step, device, self.accelerator.process_index)
        images = _augmented(self.data, flat, self.settings, generator, device)
        cond = self.conditioner.build(self.data.codes[flat].to(device),
                                      self.data.pseudo[flat].to(device))
        cond = self.conditioner.drop(cond, self.settings.cond_dropout, generator)
        sigma = self.loss_fn.sample_sigma(len(flat), device, generator)
        noise = torch.randn(images.shape, generator=generator, device=device)
        inputs = [images, sigma, noise] + ([cond] if cond is not None else [])
        return private.clipped_sum(net, self.loss_fn.given,
                                   [t.reshape(len(rows), -1, *t.shape[1:]) for t in inputs],
                                   self.plan.max_grad_norm)


def _guide_step(settings: DiffusionConfig) -> int:
    """The step after which the EMA is kept as the autoguidance guide."""
    return max(1, round(settings.guide_at * settings.steps))


def _augmented(data: TrainingData, indices: torch.Tensor, settings: DiffusionConfig,
               generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A batch as the denoiser learns it. Pixels: stored grey levels -> [-1, 1], the range EDM's
    sigma_data = 0.5 assumes, then shifted and jittered. Latents: as encoded, flipped when asked."""
    if data.codec is None:
        images = data.images[indices].to(device, torch.float32) * (2.0 / data.max_value) - 1.0
        return shift_and_jitter(images, settings.augment_shift, settings.augment_intensity,
                                generator, (-1.0, 1.0), flip=settings.augment_flip)
    latents = data.images[indices].to(device)
    if settings.augment_flip:
        flip = torch.rand(len(latents), generator=generator, device=device) < 0.5
        latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
    return latents


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


def publish(folder: Path, result: TrainingResult, data: TrainingData,
            settings: DiffusionConfig) -> dict[str, Any]:
    """The weights, the pseudo-conditions they were trained with, model.json (returned) and
    the training log."""
    save_file(result.ema, str(folder / "ema.safetensors"))
    save_file(result.guide, str(folder / "guide.safetensors"))
    if result.conditioner.uses_pseudo:
        np.save(folder / "pseudo_features.npy", data.pseudo.numpy())
    latent = None
    if data.codec is not None:
        for name in (autoencoder_files.WEIGHTS, autoencoder_files.META):
            shutil.copyfile(data.codec.folder / name, folder / name)
        latent = {"channels": int(data.images.shape[1]), "resolution": int(data.images.shape[-1]),
                  "factor": data.codec.factor}
    meta = {
        "resolution": data.resolution, "channels": 1, "latent": latent,
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
    if result.privacy is not None:
        meta["privacy"] = result.privacy
    if result.init is not None:
        meta["init"] = result.init
    write_atomic(folder / "model.json", json.dumps(meta, indent=2) + "\n")
    write_log(folder / "training_log.csv", result.log, LOG_FIELDS)
    return meta
