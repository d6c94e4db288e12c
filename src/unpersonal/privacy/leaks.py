"""Leaks of every kind we can make: releases that do leak, so that the audit and the filter are
shown to catch what generators actually leak.

A privacy check that has never failed has not been tested. `make_leaks` turns training images
into leaked images of one kind; `leaked_release` puts a share of them into a clean release in
place of as many released images. The audit must fail such a release and the filter must
reject its leaked images (`benchmarks/leaks.py` measures both, dose by dose).

Kinds (images float [N, R, R] in [0, 1] throughout):

    copy             the training image itself
    noise, shift, contrast, brightness, blur, planted
                     the audit's planted perturbations (`privacy.planted`; "planted" is all of
                     them at once), which the audit's models were tuned to see through
    flip             mirrored left to right
    crop             a crop of 80-95% of the side at a random place, resized back
    rotate           rotated 3-10 degrees either way about the centre, edges repeated
    gamma            grey levels raised to a power in 0.7-0.87 or 1.15-1.4
    resample         halved in size, then brought back (a blurred, blocky copy)
    single-image     a copy of a patient with only one training image: no re-ID network can
                     learn such a patient from pairs
    identity-probe   an unseen image of a training patient (`prepare`'s identity probes, never
                     trained on): the leak a re-ID filter exists for
    model-<sigma>    a near-copy the run's own diffusion model makes: the training image noised
                     to `sigma` (in the model's [-1, 1] units) and denoised back, conditioned on
                     its own training row, as a memorising generator returns it

The flip, crop, rotation, gamma and resampling are changes the current models were not built
around: the re-ID network and the pixel check are trained or tuned on noise, small shifts,
contrast, brightness and blur only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unpersonal.data.pixels import resize
from unpersonal.privacy.planted import PERTURBATIONS, Perturbation

# `renoise(rows, images, sigma, seeds)`: training rows and their images [N, R, R] in [0, 1]
# -> each image noised to `sigma` and denoised by a diffusion model conditioned on its row.
Renoise = Callable[[np.ndarray, np.ndarray, float, list[int]], np.ndarray]

MODEL_PREFIX = "model-"
DEFAULT_MODEL_SIGMAS = (0.2, 0.5, 1.0)


def flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images[:, :, ::-1]


def crop(images: np.ndarray, rng: np.random.Generator, zoom: tuple[float, float] = (0.8, 0.95)
         ) -> np.ndarray:
    """A square crop of `zoom` times the side, anywhere in the image, resized to the full side."""
    side = images.shape[-1]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        size = max(2, int(round(side * rng.uniform(*zoom))))
        top, left = rng.integers(0, side - size + 1, 2)
        out[i] = resize(image[top:top + size, left:left + size], side)
    return out


def rotate(images: np.ndarray, rng: np.random.Generator, degrees: tuple[float, float] = (3, 10)
           ) -> np.ndarray:
    angles = rng.uniform(*degrees, len(images)) * rng.choice([-1.0, 1.0], len(images))
    return np.stack([ndimage.rotate(image, angle, reshape=False, order=1, mode="nearest")
                     for image, angle in zip(images, angles)])


def gamma(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A power away from 1 on either side (0.7-0.87 or 1.15-1.4): a visibly re-exposed copy."""
    powers = np.where(rng.random(len(images)) < 0.5, rng.uniform(0.7, 0.87, len(images)),
                      rng.uniform(1.15, 1.4, len(images)))
    return np.clip(images, 0.0, 1.0) ** powers[:, None, None]


def resample(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = images.shape[-1]
    return np.stack([resize(resize(image, max(2, side // 2)), side) for image in images])


TRANSFORMS: dict[str, Perturbation] = {
    "copy": lambda images, rng: images,
    **{name: PERTURBATIONS[name] for name in ("noise", "shift", "contrast", "brightness", "blur")},
    "planted": PERTURBATIONS["all"],
    "flip": flip, "crop": crop, "rotate": rotate, "gamma": gamma, "resample": resample,
}
SINGLE_IMAGE = "single-image"
IDENTITY_PROBE = "identity-probe"


def leak_kinds(model_sigmas: tuple[float, ...] = DEFAULT_MODEL_SIGMAS) -> list[str]:
    """Every kind `make_leaks` can make, the model's near-copies at `model_sigmas`."""
    return [*TRANSFORMS, SINGLE_IMAGE, IDENTITY_PROBE,
            *(f"{MODEL_PREFIX}{sigma:g}" for sigma in model_sigmas)]


@dataclass(frozen=True)
class Leaks:
    """Leaked images of one kind and the training rows they leak."""

    kind: str
    images: np.ndarray
    """float32 [N, R, R] in [0, 1]"""
    rows: np.ndarray
    """the training row each one copies (identity-probe: the probe's row among the probes)"""


def make_leaks(kind: str, train_images: np.ndarray, train_patients: np.ndarray, count: int,
               seed: int, renoise: Renoise | None = None, probes: np.ndarray | None = None
               ) -> Leaks:
    """`count` leaked images of `kind` from distinct training images drawn at random (seeded),
    in the order drawn: the first k of them are a random k too, so a smaller dose taken from
    the front is as mixed (labels, patients) as the whole. Sorted rows would give the front
    the lowest rows, which follow the dataset's order (Kermany's training rows run by class).

    `train_images` float [N, R, R] in [0, 1] and their patients; `renoise` is needed for the
    model's near-copies only, `probes` (the identity probes' images) for identity-probe only.
    """
    if kind == IDENTITY_PROBE:
        available = 0 if probes is None else len(probes)
        if count > available:
            raise ValueError(f"{count} leaks of kind {kind!r} asked for, but the run has "
                             f"{available} identity probes")
        rows = np.random.default_rng([seed, *kind.encode()]).choice(available, count,
                                                                     replace=False)
        return Leaks(kind, np.asarray(probes[rows], np.float32), rows)
    if len(train_patients) != len(train_images):
        raise ValueError(f"one patient id per image needed: {len(train_images)} images, "
                         f"{len(train_patients)} ids")
    rng = np.random.default_rng([seed, *kind.encode()])
    rows = _leaked_rows(kind, train_patients, count, rng)
    images = train_images[rows].astype(np.float64)
    if kind.startswith(MODEL_PREFIX):
        if renoise is None:
            raise ValueError(f"leaks of kind {kind!r} need the diffusion model (renoise)")
        sigma = _model_sigma(kind)
        seeds = [int(value) for value in rng.integers(0, 2**63, len(rows))]
        leaked = renoise(rows, images.astype(np.float32), sigma, seeds)
    elif kind == SINGLE_IMAGE:
        leaked = images
    elif kind in TRANSFORMS:
        leaked = TRANSFORMS[kind](images, rng)
    else:
        raise ValueError(f"unknown leak kind {kind!r}; choose one of {leak_kinds()}")
    return Leaks(kind, np.clip(leaked, 0.0, 1.0).astype(np.float32), rows)


def _leaked_rows(kind: str, patients: np.ndarray, count: int, rng: np.random.Generator
                 ) -> np.ndarray:
    """Distinct training rows to leak; for single-image, rows of patients with one image."""
    if kind == SINGLE_IMAGE:
        _, first, counts = np.unique(patients, return_index=True, return_counts=True)
        pool = first[counts == 1]
    else:
        pool = np.arange(len(patients))
    if count > len(pool):
        raise ValueError(f"{count} leaks of kind {kind!r} asked for, but only {len(pool)} "
                         "training images can be leaked that way")
    return rng.choice(pool, count, replace=False)


def _model_sigma(kind: str) -> float:
    try:
        sigma = float(kind[len(MODEL_PREFIX):])
    except ValueError:
        raise ValueError(f"{kind!r}: a model leak is named model-<sigma>, e.g. model-0.5") from None
    if not sigma > 0:
        raise ValueError(f"{kind!r}: sigma must be positive")
    return sigma


def leak_count(release_size: int, share: float) -> int:
    """How many released images a share `share` of a release is: at least one."""
    if not 0 < share <= 1:
        raise ValueError(f"the leaked share must be in (0, 1], got {share}")
    return max(1, int(round(share * release_size)))


def leak_positions(release_size: int, count: int, seed: int) -> np.ndarray:
    """Which `count` of a release's images leaks replace (bool [release_size]), seeded; the
    positions of a smaller count are a subset of those of a larger one."""
    if count > release_size:
        raise ValueError(f"{count} leaks for a release of {release_size} images")
    order = np.random.default_rng([seed, 11]).permutation(release_size)
    leaked = np.zeros(release_size, bool)
    leaked[order[:count]] = True
    return leaked


def leaked_release(release: np.ndarray, leaks: np.ndarray, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The release with `len(leaks)` of its images, at `leak_positions`, replaced by the leaks;
    returns the new release and those positions (bool [N])."""
    leaked = leak_positions(len(release), len(leaks), seed)
    out = release.copy()
    out[leaked] = leaks
    return out, leaked
