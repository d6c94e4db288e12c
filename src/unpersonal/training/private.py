"""Patient-level differential privacy for the denoiser: DP-SGD (Abadi et al. 2016, "Deep
Learning with Differential Privacy", Algorithm 1) with patients, not images, as the unit.

One step:

1. **Sample patients** (Poisson): each training patient is in the step with probability
   q = batch_size / patients, independently, the sampling the accountant's analysis assumes.
   A sampled patient contributes `images_per_patient` of its images (drawn with replacement),
   each at `noise_levels` noise levels: a patient with 40 images weighs what one with 1 does.
2. **One gradient per patient**: g_p = grad of the mean EDM2 loss over that patient's rows
   (noise multiplicity, Dockhorn et al. 2022: the loss is an expectation over noise levels,
   averaged before clipping so that the clipped gradient carries less of the noise draw).
3. **Clip and noise**: g = (sum_p g_p * min(1, C / |g_p|) + N(0, sigma^2 C^2 I)) / (q * patients),
   C = `max_grad_norm`, sigma the noise multiplier. Adding or removing one patient changes the
   sum by at most C, whatever its images: that is the sensitivity the accountant prices.
4. Adam on g, EMA of the weights, the autoguidance snapshot: post-processing, free of privacy
   cost.

The accountant (PRV or RDP) and the calibration of sigma for a target epsilon come from
Opacus. The per-patient gradients and the clipping are ours: Opacus computes per-sample
gradients layer by layer with hooks, which refuse EDM2's weight-normalised layers (an MPConv
renormalises its weight in place and takes a gain argument), and it clips per batch row where
we clip per patient. `torch.func.vmap` over patients of `torch.func.grad` of the functional
model gives the exact per-patient gradient of any layer that runs batched, with no per-layer
code.

The patients and the privacy noise of step t come from a secret, not from the run's seed: DP-SGD
needs noise the adversary cannot know, and the run's seed is in its config (whoever could retrain
with one patient more or less and the same noise would see that patient's gradient exactly). The
secret is 128 bits from the operating system, drawn once per training and shared by every
process (so all sample the same patients, split them, and add the same noise after summing); it
lives in the resumable checkpoint only, so a resumed training repeats an uninterrupted one and
is gone once the weights are published. Two fresh trainings therefore differ, the one exception
to "the same config and seed give the same weights". The rest of a step's randomness (which
augmentation, noise level and condition dropout each row gets) comes from the process's seeded
stream as without privacy: it does not enter the privacy analysis, which holds for any fixed
choice of it. The noise is drawn by torch's Mersenne Twister, not a cryptographic generator, and
in floating point: attacks on either are outside what is claimed.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap

from unpersonal.artifacts.denoiser import init_folder
from unpersonal.config import DiffusionPrivacy
from unpersonal.errors import UserError

PATIENT_STREAM, NOISE_STREAM = 0, 1  # the secret's two streams of each step
PATIENTS_PER_CALL = 16  # patients per vmapped call: their per-parameter gradients are in memory


def new_secret() -> int:
    """128 bits from the operating system's random source: the seed of the patient sampling and
    the privacy noise of one training."""
    return secrets.randbits(128)


def secret_seed(secret: int, step: int, stream: int) -> int:
    """The 64-bit seed of `stream` at `step`, from the training's secret."""
    sequence = np.random.SeedSequence(secret, spawn_key=(step, stream))
    return int(sequence.generate_state(1, np.uint64)[0])


def default_delta(patients: int) -> float:
    """The largest power of ten below 1 / patients. delta bounds the chance that the guarantee
    fails outright, so delta * patients, reported beside it, should be well below one; a data
    holder who wants it smaller sets `diffusion.privacy.delta`."""
    exponent = math.floor(math.log10(1.0 / patients))
    delta = 10.0 ** exponent
    return delta if delta < 1.0 / patients else 10.0 ** (exponent - 1)


@dataclass(frozen=True)
class PrivacyPlan:
    """What the accountant was told and what it answers, as model.json and the datasheet give it."""

    epsilon_target: float
    delta: float
    noise_multiplier: float
    sample_rate: float  # q: the chance that a patient is in a step
    expected_patients: int  # q * patients: the step's gradient is divided by this
    patients: int
    steps: int  # planned
    max_grad_norm: float
    noise_levels: int
    images_per_patient: int
    accountant: str

    def epsilon_after(self, steps: int) -> float:
        """The epsilon spent after `steps` steps (fewer than planned when a time budget stopped
        training early)."""
        return spent_epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta,
                             self.accountant)

    def to_json(self, steps_done: int, unit: str = "patient") -> dict[str, Any]:
        import opacus

        return {"unit": unit, "epsilon": round(self.epsilon_after(steps_done), 4),
                "epsilon_target": self.epsilon_target, "delta": self.delta,
                "delta_times_units": round(self.delta * self.patients, 4),
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "expected_patients_per_step": self.expected_patients, "patients": self.patients,
                "steps": steps_done, "max_grad_norm": self.max_grad_norm,
                "noise_levels": self.noise_levels, "images_per_patient": self.images_per_patient,
                "accountant": f"{self.accountant} (Opacus {opacus.__version__})"}


def plan(settings: DiffusionPrivacy, patients: int, batch: int, steps: int) -> PrivacyPlan:
    """Check the settings against the data and calibrate the noise multiplier so that the
    accountant's epsilon after `steps` steps is at most `settings.epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    if patients < 2:
        raise UserError(f"diffusion.privacy: the training split has {patients} patient(s); "
                        "differential privacy needs more")
    if batch > patients:
        raise UserError(f"diffusion.batch_size {batch} is the expected number of patients per "
                        f"step under diffusion.privacy, but there are only {patients} training "
                        "patients: lower it")
    delta = settings.delta if settings.delta is not None else default_delta(patients)
    if delta >= 1.0 / patients:
        raise UserError(f"diffusion.privacy.delta {delta:g} must be below 1 / {patients} "
                        f"training patients ({1.0 / patients:.3g}): a larger delta allows "
                        "releasing a patient's data outright")
    sample_rate = batch / patients
    with warnings.catch_warnings():  # RDP's note that the best order is the largest it tried
        warnings.simplefilter("ignore")
        try:
            sigma = get_noise_multiplier(target_epsilon=settings.epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps,
                                         accountant=settings.accountant, epsilon_tolerance=0.01)
        except ValueError as error:  # Opacus: "The privacy budget is too low."
            raise UserError(f"diffusion.privacy.epsilon {settings.epsilon:g}: no noise level "
                            f"reaches it over {steps} steps at {batch} of {patients} patients "
                            f"per step ({error}); raise epsilon or lower diffusion.steps or "
                            "diffusion.batch_size") from None
    return PrivacyPlan(settings.epsilon, delta, float(sigma), sample_rate, batch, patients, steps,
                       settings.max_grad_norm, settings.noise_levels, settings.images_per_patient,
                       settings.accountant)


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str) -> float:
    """Opacus's accountant's epsilon after `steps` steps of the subsampled Gaussian mechanism."""
    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    ledger = create_accountant(accountant)
    ledger.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # PRV's numerical bound can come out a hair below zero for very large noise.
        return max(0.0, float(ledger.get_epsilon(delta)))


def check_layers(model: torch.nn.Module) -> None:
    """Refuse a model with layers that mix the samples of a batch (BatchNorm and the like, as
    Opacus's validator lists them): one patient's gradient would then depend on the others'."""
    from opacus.validators import ModuleValidator

    training = model.training
    model.train()  # the validator checks the layers as training would run them
    try:
        problems = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(training)
    if problems:
        raise UserError(f"diffusion.privacy: the model has a layer that differential privacy "
                        f"cannot train: {problems[0]}")


class PatientSampler:
    """Which patients, and which of their images, step t trains on (Poisson sampling)."""

    def __init__(self, patient_of_row: np.ndarray, sample_rate: float, images_per_patient: int,
                 secret: int, rank: int = 0, world: int = 1) -> None:
        patients, inverse = np.unique(patient_of_row, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self.rows_by_patient = order  # rows grouped by patient
        self.counts = np.bincount(inverse, minlength=len(patients))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.patients = len(patients)
        self.sample_rate, self.images_per_patient = sample_rate, images_per_patient
        self.secret, self.rank, self.world = secret, rank, world

    def draw(self, step: int) -> np.ndarray:
        """This process's sampled patients' rows [P, images_per_patient] (P may be 0)."""
        rng = np.random.default_rng(secret_seed(self.secret, step, PATIENT_STREAM))
        chosen = np.flatnonzero(rng.random(self.patients) < self.sample_rate)
        picks = rng.random((len(chosen), self.images_per_patient))  # drawn for every patient
        mine = slice(self.rank, None, self.world)
        chosen, picks = chosen[mine], picks[mine]
        offsets = np.floor(picks * self.counts[chosen, None]).astype(np.int64)
        return self.rows_by_patient[self.starts[chosen, None] + offsets]


def per_patient_gradients(model: torch.nn.Module, loss_of_rows: Any, inputs: tuple[torch.Tensor, ...]
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """d(loss)/d(weights) of each patient, and each patient's loss.

    `inputs` are tensors [P, rows, ...]; `loss_of_rows(model, *row_inputs)` gives one loss per
    row, and a patient's loss is the mean over its rows. The model must be in eval mode (its
    forward may not change it in place)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def patient_loss(weights: dict[str, torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
        state = {**weights, **buffers}
        return loss_of_rows(lambda *args, **kwargs: functional_call(model, state, args, kwargs),
                            *rows).mean()

    return vmap(grad_and_value(patient_loss), in_dims=(None, *[0] * len(inputs)))(params, *inputs)


def clip_and_sum(grads: dict[str, torch.Tensor], max_norm: float
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """sum_p g_p * min(1, C / |g_p|) over the patients of [P, ...] gradients, and |g_p|."""
    norms = torch.linalg.vector_norm(
        torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads.values()], dim=1), dim=1)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {name: torch.einsum("p,p...->...", factors, g) for name, g in grads.items()}, norms


def clipped_sum(model: torch.nn.Module, loss_of_rows: Any, inputs: list[torch.Tensor],
                max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """sum_p clip(g_p) over the patients of `inputs` ([P, rows, ...] tensors), taken
    `PATIENTS_PER_CALL` patients at a time, and each patient's loss."""
    summed = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    losses = []
    for start in range(0, len(inputs[0]), PATIENTS_PER_CALL):
        part = tuple(t[start:start + PATIENTS_PER_CALL] for t in inputs)
        grads, loss = per_patient_gradients(model, loss_of_rows, part)
        for name, value in clip_and_sum(grads, max_norm)[0].items():
            summed[name] += value
        losses.append(loss.detach())
    return summed, torch.cat(losses)


def add_noise(summed: dict[str, torch.Tensor], plan: PrivacyPlan, secret: int, step: int
              ) -> dict[str, torch.Tensor]:
    """(sum + N(0, sigma^2 C^2)) / expected patients: the private gradient. The noise comes from
    the secret's stream of the step, the same in every process (after the sums are reduced)."""
    device = next(iter(summed.values())).device
    generator = torch.Generator(device).manual_seed(secret_seed(secret, step, NOISE_STREAM))
    std = plan.noise_multiplier * plan.max_grad_norm
    return {name: (value + std * torch.randn(value.shape, generator=generator, device=device))
            / plan.expected_patients for name, value in summed.items()}


def check_init_never_saw(source: Path, patients: np.ndarray) -> bool:
    """Refuse starting weights trained on any of these training patients (differential privacy
    protects them only if nothing else the generator starts from has seen them). Returns whether
    the starting run's patients could be checked (a bare weights folder has none to compare)."""
    arrays = init_folder(source).parent / "prepare" / "arrays.npz"
    if not arrays.is_file():
        return False
    with np.load(arrays, allow_pickle=False) as data:
        seen = set(data["patient_id"][data["split"] == "train"].tolist())
    shared = seen & set(np.asarray(patients).tolist())
    if shared:
        raise UserError(f"diffusion.init {source}: its denoiser was trained on {len(shared)} of "
                        "this run's training patients; differential privacy needs starting "
                        "weights that never saw them (for example a public dataset's)")
    return True
