"""The one config object of a run.

A run is fully described by a `Config`: a preset (`demo`, `cpu`, `cpu-128`, `gpu`) gives the
defaults, a YAML file may change any of them, and `--set section.field=value` on the command
line changes any field last. Unknown keys are errors, never silently ignored: a typo in a
privacy threshold must not fall back to a default without the user knowing.

Each pipeline stage declares which sections it depends on; the run directory re-runs a stage when
those sections (or the stage's inputs) change, and skips it otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from unpersonal.errors import UserError

PresetName = Literal["demo", "cpu", "cpu-128", "gpu"]
PRESETS: tuple[str, ...] = ("demo", "cpu", "cpu-128", "gpu")


# A field added after runs existed carries this marker: at its default it stays out of the cache
# keys (`Config.section_dump`), so an upgrade does not make every finished stage of those runs
# stale; set to anything else it enters them like every other field.
KEYED_ONLY_OFF_DEFAULT = {"keyed_only_off_default": True}


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the dataset comes from and the canonical form `prepare` turns it into."""

    source: Path | None = Field(
        None, description="dataset: .npz file, folder of images, DICOM or NIfTI folder, or a CSV; "
        "none = built-in phantom demo data")
    format: Literal["auto", "npz", "images", "dicom", "nifti"] = Field(
        "auto", description="input format; auto = guess from the files")
    csv: Path | None = Field(
        None, description="CSV with path, label column(s), patient_id[, split]; default: the only "
        "*.csv in the data folder")
    label_columns: list[str] | None = Field(
        None, description="CSV label columns; default: every column but path/patient_id/split")
    label_kind: Literal["auto", "binary", "multiclass", "multilabel"] = "auto"
    resolution: int = Field(64, ge=8, le=4096, description="side of the square canonical image, px")
    fit: Literal["crop", "pad", "stretch"] = Field(
        "crop", description="how a non-square image becomes square: center-crop, zero-pad, or stretch")
    bit_depth: Literal["auto", 8, 16] = Field(
        "auto", description="canonical pixel depth; auto = 16 if any input is deeper than 8 bit")
    window: tuple[float, float] | None = Field(
        None, description="DICOM/NIfTI intensity window (center, width) after rescale; default: "
        "the DICOM header's window, else the 0.5-99.5 percentile range of each image/volume")
    nifti_axis: int = Field(2, ge=0, le=2, description="NIfTI axis along which volumes are sliced")
    nifti_skip_empty: bool = Field(True, description="drop NIfTI slices with no signal")
    no_patient_ids: bool = Field(
        False, description="the data has no patient IDs: each image counts as its own patient")
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test shares of the patient-level split made when "
        "the data has none")
    identity_probe_share: float = Field(
        0.05, ge=0.0, lt=0.5, description="share of the training images held back as identity "
        "probes: one image each of training patients with 3 or more, never trained on, that "
        "every audit shows its re-ID network linking to their patient (0: none)")

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or abs(sum(value) - 1.0) > 1e-6 or value[0] <= 0:
            raise ValueError("must be three non-negative shares summing to 1, train > 0")
        return value

    @field_validator("window")
    @classmethod
    def _positive_width(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[1] <= 0:
            raise ValueError("window width must be > 0")
        return value


class PhantomConfig(Section):
    """The built-in demo data: procedural chest X-ray phantoms with known patients."""

    n_patients: int = Field(200, ge=4)
    scans_per_patient: tuple[int, int] = (1, 6)
    finding_rate: float = Field(0.4, ge=0.0, le=1.0, description="chance that a patient "
                                "carries each finding")
    findings: int = Field(
        1, ge=1, le=4, description="kinds of finding: 1 gives a binary label, more a multi-label "
        "one (opacity, nodule, effusion, apical shadow), each carried independently",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)

    @model_validator(mode="after")
    def _scan_range(self) -> PhantomConfig:
        low, high = self.scans_per_patient
        if not 1 <= low <= high:
            raise ValueError("scans_per_patient must be (min, max) with 1 <= min <= max")
        return self


class AutoencoderConfig(Section):
    """`fit-autoencoder`: the image <-> latent map of latent diffusion (`diffusion.space: latent`).

    A KL-regularised convolutional autoencoder (`models.autoencoder`) trained on the training
    split alone with L1, SSIM and a small KL term; no loss needs downloaded weights.
    """

    factor: Literal[4, 8] = Field(
        4, description="downsampling factor: a 128 px image becomes a 32 px (4) or 16 px (8) "
        "latent")
    latent_channels: int = Field(4, ge=1, le=16)
    width: int = Field(
        8, ge=4, description="channels at full resolution, doubled at each halving; the "
        "full-resolution layers cost most on a CPU")
    res_blocks: int = Field(1, ge=1, le=4, description="residual blocks per resolution")
    kl_weight: float = Field(
        1e-6, ge=0.0, description="weight of the KL term: small, so the latents keep detail while "
        "their scale stays bounded")
    ssim_weight: float = Field(
        0.2, ge=0.0, description="weight of 1 - SSIM (MONAI's SSIMLoss) beside the L1 loss: "
        "structure as well as grey levels")
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0.0, description="Adam peak learning rate (cosine decay)")
    max_minutes: float | None = Field(None, gt=0.0)
    checkpoint_every: int = Field(250, ge=1)


class DiffusionPrivacy(Section):
    """Differentially private training of the denoiser (DP-SGD at the level of patients)."""

    epsilon: float = Field(
        ..., gt=0.0, description="the privacy budget the whole training may spend; the noise is "
        "calibrated so that the accountant's epsilon after `diffusion.steps` steps is this")
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="the accountant's delta; default: the largest power of "
        "ten below 1 / (training patients); must be below 1 / (training patients)")
    max_grad_norm: float = Field(
        1.0, gt=0.0, description="each patient's gradient is clipped to this L2 norm")
    noise_levels: int = Field(
        2, ge=1, description="noise levels drawn per image and step, averaged before clipping "
        "(noise multiplicity: the EDM loss is an expectation over noise levels)")
    images_per_patient: int = Field(
        1, ge=1, description="images drawn (with replacement) from each sampled patient per step")
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="Opacus's privacy accountant: prv (privacy random variables, tighter) "
        "or rdp (Renyi DP)")


class DiffusionConfig(Section):
    """The generator: an EDM2-style denoiser, how it is conditioned, and its training budget."""

    space: Literal["pixel", "latent"] = Field(
        "pixel", description="denoise the images themselves, or the latents of the run's "
        "autoencoder (`fit-autoencoder`), decoded before anything judges them",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    conditioning: Literal["uncond", "class", "pseudo", "class+pseudo"] = Field(
        "class+pseudo", description="what the denoiser is told: nothing, the labels, a training "
        "image's embedding (diversity-aware pseudo-conditioning), or both")
    cond_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="chance of dropping each condition part while training, "
        "so one network also learns the null condition for classifier-free guidance")
    pseudo_features: Path | None = Field(
        None, description=".npy [N_train, D] of pseudo-conditioning features in training-split "
        "order; default: the embedder's, or unit-norm PCA of the training pixels until it exists")
    pseudo_dim: int = Field(32, ge=2, description="size of the PCA stand-in features")
    model_channels: int = Field(32, ge=8)
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = Field(2, ge=1)
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    sigma_data: float = Field(0.5, gt=0.0)
    p_mean: float = -0.4
    p_std: float = Field(1.0, gt=0.0)
    batch_size: int = Field(64, ge=1, description="images per optimiser step, over all processes")
    steps: int = Field(2000, ge=1, description="optimiser steps (the reproducible budget)")
    max_minutes: float | None = Field(
        None, gt=0.0, description="stop earlier after this wall time (not reproducible)")
    lr: float = Field(0.01, gt=0.0, description="EDM2 reference learning rate (Adam, betas 0.9/0.99)")
    lr_ref_steps: int = Field(1000, ge=1, description="steps before the 1/sqrt(t) decay starts")
    warmup_steps: int = Field(100, ge=0)
    ema_std: float = Field(0.1, gt=0.0, lt=0.3, description="EDM2 power-function EMA relative width")
    guide_at: float = Field(
        0.125, gt=0.0, lt=1.0, description="share of training after which the EMA is saved as the "
        "autoguidance guide (an early, weaker model of the same data)")
    augment_shift: int = Field(2, ge=0, description="random shifts of up to this many pixels "
                               "(pixel space; latents are encoded once, unshifted)")
    augment_intensity: float = Field(
        0.05, ge=0.0, lt=0.5, description="random brightness/contrast change of up to this share "
        "(pixel space only)")
    augment_flip: bool = Field(
        False, description="left-right flips; off by default since anatomy is lateral")
    checkpoint_every: int = Field(250, ge=1, description="steps between resumable checkpoints")
    privacy: DiffusionPrivacy | None = Field(
        None, description="train with patient-level differential privacy (DP-SGD through Opacus's "
        "accountant); batch_size is then the expected number of patients per step",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    init: Path | None = Field(
        None, description="start from another run's denoiser (a run folder, or a folder with "
        "model.json and ema.safetensors), for example one trained on public data",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)

    @model_validator(mode="after")
    def _private_training_is_possible(self) -> DiffusionConfig:
        if self.privacy is None:
            return self
        if self.space == "latent":
            raise ValueError("diffusion.privacy needs diffusion.space: pixel (the autoencoder "
                             "is trained without differential privacy, and its decoder would "
                             "carry what it learnt)")
        if "pseudo" in self.conditioning:
            raise ValueError("diffusion.privacy needs diffusion.conditioning: class or uncond "
                             "(pseudo-conditions are computed from every training patient "
                             "without differential privacy)")
        if self.dropout > 0:
            raise ValueError("diffusion.privacy needs diffusion.dropout: 0 (per-patient "
                             "gradients are taken without dropout)")
        return self


class SamplingConfig(Section):
    """How images are drawn from the trained denoiser."""

    solver: Literal["dpmpp2m", "heun"] = Field(
        "dpmpp2m", description="dpmpp2m (fast multistep) or heun (EDM reference, 2n-1 NFE)")
    steps: int = Field(16, ge=1, description="solver steps; NFE is steps for dpmpp2m, 2*steps-1 "
                                             "for heun (times 2 with classifier-free guidance)")
    guidance: float = Field(1.0, ge=0.0, description="guidance weight w; 1 = none")
    guide: Literal["cfg", "autoguidance"] = Field(
        "cfg", description="guide against the null condition, or against the early checkpoint")
    guidance_against: Literal["empty", "labels"] = Field(
        "labels", description="what classifier-free guidance pushes away from: "
        "the empty condition (empty), or the labels alone, so that w weighs the source image's "
        "embedding only and w = 0 is the class-conditional model (a model told the labels alone "
        "then draws from its labels whatever w)")
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = Field(7.0, gt=0.0)
    batch_size: int = Field(64, ge=1)
    count: int = Field(64, ge=1, description="images `unpersonal sample` draws")

    def ignores_weight(self, conditioning: str) -> bool:
        """Whether every guidance weight draws the same images from a denoiser told
        `conditioning`: told the labels alone and guided against the labels, its null is its
        condition (`Conditioner.null`)."""
        return (conditioning == "class" and self.guide == "cfg"
                and self.guidance_against == "labels")


class ViewAugmentation(Section):
    """Random views of one grey image for self-supervised and re-identification training.

    Kept to what a radiograph plausibly varies by between acquisitions of one patient: small
    geometric changes, exposure and contrast, blur and noise. No left-right flips by default,
    since anatomy is lateral.
    """

    crop_scale: tuple[float, float] = Field(
        (0.7, 1.0), description="share of the image side a random crop keeps (min, max)")
    rotate_degrees: float = Field(8.0, ge=0.0, le=45.0)
    shift: float = Field(0.06, ge=0.0, le=0.3, description="random shift, share of the side")
    brightness: float = Field(0.2, ge=0.0, le=1.0, description="additive change of up to this")
    contrast: float = Field(0.3, ge=0.0, le=1.0, description="multiplicative change of up to this")
    gamma: float = Field(0.3, ge=0.0, le=1.0, description="gamma drawn in [1/(1+g), 1+g]")
    blur_sigma: float = Field(0.8, ge=0.0, description="Gaussian blur sigma up to this (pixels)")
    noise: float = Field(0.03, ge=0.0, description="Gaussian pixel noise std up to this")
    flip: bool = False


class EmbedderConfig(Section):
    """The self-supervised image encoder: features for pseudo-conditioning and fidelity metrics."""

    # Defaults measured on the phantoms at 32 px (one core): VICReg at width 16, batch 128, 600
    # steps reached a linear-probe AUC of 0.84 on two seeds in about 5 CPU-minutes; SimCLR
    # trailed it at every budget tried, and width 32 / 1,500 steps cost 8x more for 0.64.
    method: Literal["simclr", "vicreg"] = Field(
        "vicreg", description="contrastive (SimCLR, NT-Xent) or variance-invariance-covariance")
    extractor: Path | None = Field(
        None, description="use this TorchScript (.pt) or safetensors file instead of training "
        "one; it maps [B, 1, R, R] images in [0, 1] to [B, D] features")
    dim: int = Field(128, ge=2, description="size of the unit-norm feature")
    width: int = Field(16, ge=4, description="channels of the encoder's first stage")
    input_size: int | None = Field(
        None, ge=8, description="larger images are area-downsampled to this side inside the "
        "network, so that its cost does not grow with data.resolution (none: full resolution)",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=4)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    temperature: float = Field(0.2, gt=0.0, description="SimCLR softmax temperature")
    max_minutes: float | None = Field(None, gt=0.0)
    checkpoint_every: int = Field(250, ge=1)
    augment: ViewAugmentation = ViewAugmentation()


class ReidConfig(Section):
    """The patient re-identification network: "are these two images of the same patient?"."""

    dim: int = Field(128, ge=2, description="size of the unit-norm re-ID embedding")
    width: int = Field(32, ge=4)
    input_size: int = Field(
        32, ge=8, description="larger images are area-downsampled to this side inside the "
        "network: identity lies in coarse anatomy, and each halving costs 4x less")
    stem_stride: Literal[1, 2] = Field(
        1, description="2 halves the resolution in the first convolution: a 64 px input then "
        "costs about what a 32 px one does",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=2, description="images per step: two of each patient drawn "
                            "(two views of one image for instance pairs)")
    instance_share: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of each step's pairs that are two strong views "
        "(copy_augment) of one training image of any patient, single-image patients included: "
        "every image then teaches the network that its copies, flipped, cropped, rotated or "
        "re-exposed, are the same instance (0: same-patient pairs only; on Kermany it cost "
        "identity and did not make copies stand out, BENCHMARKS.md)",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    hard_negatives: float = Field(
        0.5, ge=0.0, le=1.0, description="share of negative pairs mined as the hardest in the batch")
    loss: Literal["supcon", "bce"] = Field(
        "supcon", description="supervised contrastive over every pair in the batch, or BCE on "
        "balanced pairs with hard negatives; the score's scale and bias always learn by BCE")
    temperature: float = Field(0.1, gt=0.0, description="supervised-contrastive temperature")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    validate_every: int = Field(200, ge=1, description="steps between validation ROC-AUCs")
    patience: int = Field(5, ge=1, description="validations without improvement before stopping")
    sensitivity: float = Field(
        0.99, gt=0.5, lt=1.0, description="share of held-out same-patient pairs the calibrated "
        "threshold must flag")
    max_minutes: float | None = Field(None, gt=0.0)
    checkpoint_every: int = Field(250, ge=1)
    augment: ViewAugmentation = ViewAugmentation()
    copy_augment: ViewAugmentation = Field(
        ViewAugmentation(crop_scale=(0.5, 1.0), rotate_degrees=20.0, shift=0.1, gamma=0.5,
                         blur_sigma=1.0, noise=0.05, flip=True),
        description="the views of the instance pairs: the edits a leaked copy may carry",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)


class ClassifierConfig(Section):
    """The downstream classifier: real baseline, label consistency, train-on-synthetic utility.

    Defaults measured on Kermany CXR at 32 px (4,699 training images) on a busy 2-core CPU:
    width 16 for 10 epochs reaches test ROC-AUC 0.957-0.965 over 3 seeds in about 90 s of one
    core (2-2.5 min wall, one torch thread); width 8 reaches 0.943-0.950 in half the time.
    """

    width: int = Field(16, ge=4, description="channels of the encoder's first stage")
    input_size: int | None = Field(
        None, ge=8, description="larger images are area-downsampled to this side inside the "
        "network (none: full resolution); each halving costs about 4x less",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    epochs: int = Field(10, ge=1, description="passes over the training images (the cosine "
                                              "learning-rate schedule spans them)")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0.0, description="AdamW peak learning rate")
    weight_decay: float = Field(1e-4, ge=0.0)
    augment_shift: int = Field(2, ge=0, description="random shifts of up to this many pixels")
    augment_intensity: float = Field(
        0.1, ge=0.0, lt=0.5, description="random brightness/contrast change of up to this share")
    patience: int = Field(
        4, ge=1, description="epochs without a better validation AUC before stopping")
    max_minutes: float | None = Field(None, gt=0.0)


class PrivacyConfig(Section):
    """The nearest-neighbour index and the calibrated distance floor the filter and audit use."""

    knn_exact_max: int = Field(
        50_000, ge=1, description="above this many indexed vectors an approximate index is used")
    knn_lists: int | None = Field(None, ge=1, description="IVF lists (default: about 4 sqrt(N))")
    knn_probe: int = Field(16, ge=1, description="IVF lists searched per query")
    reid_neighbours: int = Field(
        16, ge=1, description="training images, nearest in re-ID space, each candidate is also "
        "checked against")
    reid_heldout_quantile: float = Field(
        0.98, gt=0.5, lt=1.0, description="the check against all training patients rejects a "
        "candidate more linked to one of them than this share of held-out patients' real images "
        "are to theirs (never at a lower score than the pair threshold)")
    floor_quantile: float = Field(
        0.01, ge=0.0, lt=0.5, description="distance floor: this quantile of held-out real "
        "images' distances to their nearest training image (embedding and pixel space)")
    pixel_max_shift: int = Field(
        3, ge=0, le=8, description="pixel-space check: a copy shifted by up to this many pixels "
        "(at pixel_resolution) is still a copy")
    pixel_smooth: float = Field(
        0.7, ge=0.0, description="pixel-space check: Gaussian smoothing (px) before comparing, so "
        "that noise does not hide a copy")
    pixel_neighbours: int = Field(
        16, ge=1, description="not read: the pixel-space check compares every candidate with "
        "every training image; kept so that configs that set it still load")
    pixel_mirror: bool = Field(
        True, description="pixel-space check: a left-right mirrored copy is still a copy (a "
        "chest film is not symmetric, so a mirrored film is its patient's anatomy)")
    pixel_resolution: int = Field(
        32, ge=16, description="pixel-space check: larger images are compared at this size, so "
        "the check costs the same at every resolution")


class GenerateConfig(Section):
    """`unpersonal generate`: candidates per training image, the filter's rules, the selection.

    The solver, its steps, the guidance weight and the guide come from `sampling`; here is what
    happens around them. Sources are processed in blocks of `block_size`: a block is the unit of
    resuming and of sharding across processes, and its batches do not depend on how many
    processes run, so one process and many give the same set.
    """

    count: int | None = Field(
        None, ge=1, description="sources to generate for (default: every training image once; "
        "more cycles through them again in a new order)")
    candidates: int = Field(8, ge=1, description="K: most candidates drawn per source and attempt")
    mode: Literal["first", "best"] = Field(
        "first", description="first: draw in rounds and stop at the first survivor whose labels "
        "agree within `tolerance`; best: draw all K and keep the best survivor")
    round_size: int = Field(
        1, ge=1, description="candidates per source per round in first mode: 1 makes the common "
        "case (the first candidate passes) cost one candidate")
    tolerance: float = Field(
        0.5, ge=0.0, description="largest label divergence between a candidate and its source "
        "that counts as the same labels (multi-label: on every label): a first-mode search ends "
        "at the first such survivor")
    label_gate: bool = Field(
        True, description="keep only survivors within `tolerance` (others: rejected:label), so "
        "every released image looks like its label to the classifier; false keeps the least "
        "divergent survivor whatever its divergence (the reference behaviour)")
    selection: Literal["symmetric-kl", "jensen-shannon", "total-variation"] = Field(
        "symmetric-kl", description="divergence between the classifier's outputs on a candidate "
        "and on its source; the survivor with the smallest is kept")
    keep_second: bool = Field(False, description="also keep the second-best survivor")
    attempts: int = Field(
        3, ge=1, description="tries per source; each new try draws new seeds with guidance "
        "lowered by `guidance_step`, down to `guidance_floor`; then the source is skipped")
    guidance: float | None = Field(
        None, ge=0.0, description="guidance weight of the first attempt (default: "
        "sampling.guidance)")
    guidance_step: float = Field(0.5, ge=0.0)
    guidance_floor: float = Field(
        0.0, ge=0.0, description="guidance never drops below this; with guidance against the "
        "labels, 0 lets the last attempts follow the labels alone")
    block_size: int = Field(64, ge=1, description="sources per resumable, shardable block")
    pseudo_condition: Literal["source", "neighbours"] = Field(
        "source", description="the embedding a candidate is drawn from (at guidance w > 0): its "
        "source's own, or the mean of the source's `pseudo_neighbours` nearest training images "
        "of other patients with the same labels, which keeps the source's mode and averages its "
        "patient away",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    pseudo_neighbours: int = Field(8, ge=1, description="neighbours averaged by "
                                                        "pseudo_condition=neighbours",
        json_schema_extra=KEYED_ONLY_OFF_DEFAULT)
    reid_check: Literal["neighbours", "source"] = Field(
        "neighbours", description="compare a candidate with its source and its nearest training "
        "images in re-ID space (all patients), or with its source only (the reference recipe)")
    reid_threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="fixed re-ID score threshold (the reference recipe "
        "uses 0.5); default: the one calibrated on held-out patients")
    distance_floors: bool = Field(
        True, description="also reject candidates closer to a training image than the "
        "calibrated floor (embedding and pixel space); off only to reproduce the reference")


class AuditConfig(Section):
    """`unpersonal audit`: the audit's own models and the attacks' settings.

    The audit must not restate the filter. Its embedder and re-ID network are trained apart from
    the filter's, with another seed and another width, on the same training patients, so a
    filtered set is judged by models it was not selected against. Held-out images are the
    validation split's (the test split's when validation has fewer than two patients).
    """

    seed_offset: int = Field(1, ge=1, description="the audit models train with seed + this")
    embedder_width: int = Field(24, ge=4, description="the audit embedder's width (the filter's "
                                                      "is embedder.width)")
    reid_width: int = Field(24, ge=4, description="the audit re-ID network's width (the "
                                                  "filter's is reid.width)")
    reid_neighbours: int = Field(16, ge=1, description="training images, nearest in re-ID "
                                 "space, each released image is verified against")
    pso_thresholds: tuple[float, ...] = Field(
        (0.5, 0.8, 0.9, 0.95, 0.99), description="re-ID score thresholds t of the singling-out "
        "predicates 'score with s >= t'; the audit's threshold and the median, 90th and 99th "
        "percentiles of held-out images' best scores are always added; of these, those where the "
        "predicates match at most one patient on average are tested")
    pso_repeats: int = Field(999, ge=2, description="permutations of released and held-out "
                             "images behind the singling-out interval and p-value, whose "
                             "smallest value is 1 / (repeats + 1), below what the Holm "
                             "correction over the audit's eight tests needs")
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="family-wise error of the privacy "
                         "verdicts together: an honest release fails any of them with at most "
                         "this probability (Holm's correction)")
    planted: int = Field(200, ge=0, description="training images mixed in as near-copies to "
                                                "check that the audit catches them")


class EvaluateConfig(Section):
    """`unpersonal evaluate`: fidelity, diversity and utility of the released set."""

    classifier_seeds: int = Field(
        1, ge=1, description="training seeds of each utility classifier; figures are their mean "
        "(a classifier's test AUC moves with its seed: use 5 or more for a release)")
    real_plus_synthetic: bool = Field(
        True, description="also train on real + synthetic images together")
    pretrain_finetune: bool = Field(
        True, description="also pretrain on the synthetic images, then fine-tune on the real "
        "training images with the same settings")
    prdc_k: int = Field(5, ge=1, description="neighbours for precision/recall/density/coverage")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    restoration: bool = Field(True, description="also train a denoiser and a x2 super-resolution "
                                                "network on each set (restoration utility)")
    restoration_steps: int = Field(600, ge=1)
    restoration_batch: int = Field(32, ge=1)
    restoration_width: int = Field(32, ge=4)
    noise_sigma: float = Field(0.1, gt=0.0, lt=1.0, description="test noise of the denoiser")
    equivalence_psnr_db: float = Field(
        0.5, gt=0.0, description="restoration: a synthetic-trained network is equivalent to the "
        "real-trained one when its mean PSNR is within this many dB (two one-sided tests)")
    equivalence_ssim: float = Field(
        0.01, gt=0.0, description="restoration: the same margin for the mean SSIM")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of every interval")


class Config(Section):
    """Everything a run needs; `config.yaml` in the run directory is this, resolved."""

    preset: PresetName = "demo"
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    phantoms: PhantomConfig = PhantomConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    sampling: SamplingConfig = SamplingConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    reid: ReidConfig = ReidConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    generate: GenerateConfig = GenerateConfig()
    audit: AuditConfig = AuditConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _guidance_weighs_something(self) -> Config:
        """A model told the labels alone and guided against the labels draws from its labels
        whatever the weight (`schedule.guidance_at`): refuse a weight it would ignore."""
        if not self.sampling.ignores_weight(self.diffusion.conditioning):
            return self
        for option, weight in (("sampling.guidance", self.sampling.guidance),
                               ("generate.guidance", self.generate.guidance)):
            if weight not in (None, 0.0, 1.0):
                raise ValueError(
                    f"{option}={weight:g} would change nothing: a model told the labels alone "
                    "(diffusion.conditioning=class) guided against the labels draws from them "
                    "at any weight; set sampling.guidance_against=empty for classifier-free "
                    "guidance on the labels")
        return self

    def section_dump(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named sections (plus the seed) as plain data: what a stage's cache key covers."""
        dumped = self.model_dump(mode="json")
        return {"seed": dumped["seed"], **{name: _keyed(getattr(self, name), dumped[name])
                                           for name in names}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _keyed(section: Section, dumped: dict[str, Any]) -> dict[str, Any]:
    """A section's dump without the fields marked KEYED_ONLY_OFF_DEFAULT that are at their
    default."""
    return {name: value for name, value in dumped.items()
            if not ((info := type(section).model_fields[name]).json_schema_extra
                    == KEYED_ONLY_OFF_DEFAULT and getattr(section, name) == info.default)}


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_CPU: dict[str, Any] = {
    "data": {"resolution": 32}, "generate": {"guidance": 0.0, "attempts": 2},
    "sampling": {"steps": 10},
    "diffusion": {"model_channels": 32, "num_blocks": 1, "attn_resolutions": [],
                  "steps": 1200, "batch_size": 64, "lr_ref_steps": 1000}}


# Presets only state what differs from the field defaults above.
_PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # Budgets measured on a 2-core CPU (BENCHMARKS.md): a 24-channel, one-block UNet trains at
    # about 110 images/s at 32 px, a 32-channel one at about 85; each doubling of the resolution
    # costs about 4x. Hence 32 px on CPUs, and the big model only on GPUs.
    # The demo: 400 phantom patients, a fifth of them for testing, so that its intervals are
    # about +-1 point; chosen on the validation split (BENCHMARKS.md, "A finding the demo's
    # generator can learn"). The diffusion model is told the labels alone: a model told labels
    # and embedding, sampled from the labels, taught 3 points less on validation, since it sees
    # the labels alone in 9% of its training examples. A 16-channel model taught as much as a
    # 24-channel one at half the cost; 600 steps and a 50-step embedder as much as 800 and 75
    # ("A shorter demo"). The privacy models train briefly: phantom patients separate easily
    # (re-ID validation AUC 0.996). Within 10 minutes the evaluation trains the one classifier
    # the utility verdict needs; the report's other rows are for real releases.
    "demo": {"data": {"resolution": 32, "split_fractions": [0.7, 0.1, 0.2]},
             "phantoms": {"n_patients": 400},
             "diffusion": {"conditioning": "class", "model_channels": 16, "num_blocks": 1,
                           "attn_resolutions": [], "steps": 600, "batch_size": 32,
                           "lr_ref_steps": 400},
             "generate": {"attempts": 2},
             "sampling": {"steps": 10},
             "embedder": {"steps": 50},
             "reid": {"width": 24, "steps": 200, "validate_every": 50},
             "audit": {"embedder_width": 16, "reid_width": 16},
             "evaluate": {"real_plus_synthetic": False, "pretrain_finetune": False,
                          "restoration": False}},
    # On Kermany at 32 px, candidates following their source's embedding (w = 1) pass the
    # re-ID check against that source 3% of the time, w = 0.5 12%, the labels alone (w = 0) 32%
    # (benchmarks/conditions.py). Drawn from the mean embedding of the source's neighbours
    # (generate.pseudo_condition=neighbours), 99% pass the filter and the release covers more
    # of the data, but on one training its classifier scored 2.7 points below the labels-only
    # release's (benchmarks/diversity.py): the cpu preset samples from the labels. Ten solver
    # steps cost 0.68x sixteen at the same sample quality; a third attempt spent half of all
    # candidates on the sources it still skipped, so two attempts. The diffusion model trains
    # 1,200 steps: over three pipeline seeds the release taught the classifier 1.0 point more
    # than at 2,400 (mean gap to real -0.8 against -1.8 pp) and 4,800 less still, in half the
    # time; the closer fit to the training pool carries less over to the test split.
    "cpu": _CPU,
    # The cpu preset at 128 px: the denoiser works on the 4 x 32 x 32 latents of a factor-4
    # autoencoder, where the cpu preset's UNet trains 20x faster than on the 128 px pixels, at
    # the cost it has on 32 px pixels (benchmarks/latent.py, side by side). On Kermany (4,466
    # training images) the whole run took 5.3 hours on 2 cores, a third of it the evaluation.
    # The embedder and the re-ID network see 32 px copies, as at 32 px; the classifier (the
    # label gate and the utility figures) sees 64 px, at 4x the 32 px cost where 128 px would
    # cost 16x. Restoration utility is left to the 32 px presets: its networks work at the
    # full resolution.
    "cpu-128": _deep_merge(_CPU, {
        "data": {"resolution": 128}, "diffusion": {"space": "latent"},
        "embedder": {"input_size": 32}, "classifier": {"input_size": 64},
        "evaluate": {"restoration": False}}),
    # GPUs, 256 px in latent space: a factor-8 autoencoder gives 4 x 32 x 32 latents, on which
    # the large UNet costs what it would on 32 px pixels. The privacy models see 64 px copies
    # (identity lies in coarse anatomy) and the classifier 128 px. Not yet run end to end.
    "gpu": {"data": {"resolution": 256},
            "autoencoder": {"factor": 8, "width": 32, "res_blocks": 2, "steps": 20000,
                            "batch_size": 32, "checkpoint_every": 1000},
            "diffusion": {"space": "latent", "model_channels": 128, "channel_mult": [1, 2, 2, 2],
                          "attn_resolutions": [16, 8], "num_blocks": 3, "steps": 100000,
                          "batch_size": 256, "lr_ref_steps": 20000, "checkpoint_every": 2000},
            "embedder": {"input_size": 64}, "reid": {"input_size": 64, "stem_stride": 2},
            "classifier": {"input_size": 128}},
}


def load_config(
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data_source: Path | None = None,
) -> Config:
    """Resolve a config: preset defaults <- YAML file <- `--data` <- `--set key=value` overrides.

    Without an explicit preset, a run on the built-in phantoms uses `demo` and a run on the
    user's own data uses `cpu`.
    """
    from_file = _read_yaml(config_file) if config_file else {}
    chosen = preset or from_file.get("preset")
    merged: dict[str, Any] = {}
    if data_source is not None:
        _set_path(merged, "data.source", str(data_source))
    for item in overrides:
        key, value = _parse_override(item)
        _set_path(merged, key, value)
    merged = _deep_merge(from_file, merged)
    if chosen is None:
        data_section = merged.get("data")
        has_data = isinstance(data_section, dict) and data_section.get("source") is not None
        chosen = "cpu" if has_data else "demo"
    if chosen not in PRESETS:
        raise UserError(f"unknown preset {chosen!r}: choose one of {', '.join(PRESETS)}")
    merged = _deep_merge(copy.deepcopy(_PRESET_OVERRIDES[chosen]), merged)
    merged["preset"] = chosen
    try:
        config = Config.model_validate(merged)
    except ValidationError as error:
        origin = f"config file {config_file}" if config_file else "config"
        raise UserError(f"{origin}: {_describe(error)}") from None
    if config.data.source is not None:
        config.data.source = config.data.source.expanduser().resolve()
    if config.data.csv is not None:
        config.data.csv = config.data.csv.expanduser().resolve()
    if config.diffusion.pseudo_features is not None:
        config.diffusion.pseudo_features = config.diffusion.pseudo_features.expanduser().resolve()
    if config.diffusion.init is not None:
        config.diffusion.init = config.diffusion.init.expanduser().resolve()
    if config.embedder.extractor is not None:
        config.embedder.extractor = config.embedder.extractor.expanduser().resolve()
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {error}".splitlines()[0]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
    # Every section (and sub-section, e.g. reid.augment) must be a mapping: merged with --data or
    # --set, a section given as a scalar or a list would be replaced by theirs, not refused.
    pending: list[tuple[type[BaseModel], dict[str, Any], str]] = [(Config, loaded, "")]
    while pending:
        model, tree, prefix = pending.pop()
        for name, value in tree.items():
            field = model.model_fields.get(name) if isinstance(name, str) else None
            kind = field.annotation if field is not None else None
            if not (isinstance(kind, type) and issubclass(kind, BaseModel)) or value is None:
                continue  # a plain field, or an empty section (`data:` alone): for validation
            if not isinstance(value, dict):
                raise UserError(f"config file {path}: section '{prefix}{name}' must be a mapping "
                                f"of fields (field: value lines indented under '{name}:'), not "
                                f"{type(value).__name__} {value!r}")
            pending.append((kind, value, f"{prefix}{name}."))
    return loaded


def _parse_override(item: str) -> tuple[str, Any]:
    """`data.resolution=32` -> ("data.resolution", 32); values are read as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected section.field=value, e.g. data.resolution=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {part} is a field, not a section")
    node[leaf] = value


def _describe(error: ValidationError) -> str:
    """The first validation problem in one line, naming the dotted key."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown key {where!r} (check the spelling; `unpersonal config --help` lists the fields)"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
