"""ODE samplers for an EDM denoiser, with guidance and honest cost accounting.

Sampling integrates EDM's probability-flow ODE, dx/dsigma = (x - D(x; sigma)) / sigma, from pure
noise at sigma_max down to sigma = 0 on Karras's schedule. Two solvers:

* `heun_sample`: EDM's deterministic 2nd-order Heun (Karras et al. 2022, Algorithm 1 without
  churn). The reference: n steps cost 2n - 1 network evaluations (NFE), 32 steps = 63 NFE.
* `dpmpp_2m_sample`: DPM-Solver++(2M) (Lu et al. 2022): a multistep exponential integrator on the
  denoised estimate in log-sigma time. It reuses the previous step's estimate instead of a second
  evaluation, so n steps cost n NFE; it is the fast solver, meant for 10-24 NFE.

Generation draws K candidates per training image and rejects most of them, so every evaluation
counts: `GuidedDenoiser` counts forward passes per sample, a classifier-free-guided step counts
as 2 even though its conditional and null halves run as one batched call.

Reproducibility: each sample's starting noise comes from its own generator seeded with its seed
(`initial_noise`), and nothing in a solver mixes samples, so an image depends on its seed and
condition only, not on its batch. The solver state is float64 (it is one image per sample, cheap
next to the network; float32 on Apple's MPS, which has no float64) so that step arithmetic adds no
error of its own; the network sees float32, the dtype the denoiser protocol takes and returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DenoiserProtocol = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""denoiser(x [B,C,H,W], sigma [B], cond [B, cond_dim] | None) -> D(x; sigma), float32.
cond None or an all-zero row is the null (unconditional) condition."""

DenoiseFn = Callable[[Tensor, float], Tensor]
"""What a solver calls: denoise(x [B,...] in the state dtype, sigma) -> D(x; sigma), same dtype."""

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
MODEL_DTYPE = torch.float32  # what the denoiser protocol takes and returns


# ---------------------------------------------------------------------------------------------
# Noise schedule


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> Tensor:
    """Karras et al. 2022 (eq. 5): `num_steps` noise levels from sigma_max down to sigma_min,
    evenly spaced in sigma^(1/rho), then a trailing 0 (float64, length num_steps + 1).

    rho = 7 spends most steps at low noise, where the image's detail is decided. One step gives
    [sigma_max, 0].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if rho <= 0.0:
        raise ValueError(f"rho must be positive, got {rho}")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    top, bottom = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (top + ramp * (bottom - top)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints, not pow(pow()) round-off
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _step_pairs(sigmas: Tensor) -> list[tuple[float, float]]:
    """(sigma, sigma_next) per step, as Python floats, after checking the schedule's shape."""
    values = [float(s) for s in sigmas.detach().cpu().tolist()]
    if len(values) < 2 or values[-1] != 0.0:
        raise ValueError("a sampling schedule needs at least one step and must end at sigma = 0")
    if any(not nxt < cur for cur, nxt in zip(values, values[1:])):
        raise ValueError(f"sigmas must be positive and strictly decreasing before the final 0, "
                         f"got {values}")
    return list(zip(values, values[1:]))


# ---------------------------------------------------------------------------------------------
# Solvers


def heun_sample(denoise: DenoiseFn, noise: Tensor, sigmas: Tensor) -> Tensor:
    """EDM's Heun sampler (Algorithm 1, no churn) from unit noise to sigma = 0.

    Each step takes an Euler step along the ODE slope (x - D) / sigma and corrects it with the
    slope at its end point; the last step, to sigma = 0, has no end-point slope and stays Euler
    (which lands exactly on D). n steps cost 2n - 1 calls of `denoise`.
    """
    x = noise * float(sigmas[0])
    for sigma, sigma_next in _step_pairs(sigmas):
        slope = (x - denoise(x, sigma)) / sigma
        x_euler = x + (sigma_next - sigma) * slope
        if sigma_next == 0.0:
            x = x_euler
            continue
        slope_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
        x = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
    return x


def dpmpp_2m_sample(denoise: DenoiseFn, noise: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from unit noise to sigma = 0.

    In log-sigma time the ODE's linear part integrates exactly, leaving the denoised estimate as
    the only thing to approximate over a step:
        x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D_hat.
    D_hat is the current D (first order) on the first step, where no history exists, and on the
    last step, where sigma_next = 0 makes x_next = D_hat and extrapolating an earlier estimate
    into the final image would only add error. On every other step it is D extrapolated linearly
    in log-sigma from the previous step's estimate to the step's midpoint, which makes the step
    second-order at no extra evaluation: n steps cost n calls of `denoise`.
    """
    x = noise * float(sigmas[0])
    previous: tuple[Tensor, float] | None = None  # (D, log-sigma length) of the step before
    for sigma, sigma_next in _step_pairs(sigmas):
        denoised = denoise(x, sigma)
        if sigma_next == 0.0:
            x = denoised
            break
        h = math.log(sigma / sigma_next)
        estimate = denoised if previous is None else _midpoint_extrapolation(denoised, *previous, h)
        x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
        previous = (denoised, h)
    return x


def _midpoint_extrapolation(denoised: Tensor, previous_denoised: Tensor, previous_h: float,
                            h: float) -> Tensor:
    """D at the middle of the coming step, extrapolated from the last two estimates.

    The estimates lie previous_h apart in log-sigma; the step's midpoint is h / 2 ahead, hence
    the factor h / (2 previous_h) on their difference (1 / (2r) in the paper, r = previous_h / h).
    """
    return denoised + (h / (2.0 * previous_h)) * (denoised - previous_denoised)


SOLVERS: dict[str, Callable[[DenoiseFn, Tensor, Tensor], Tensor]] = {
    "dpmpp2m": dpmpp_2m_sample,
    "heun": heun_sample,
}


def solver_evaluations(solver: str, num_steps: int) -> int:
    """Denoiser evaluations a solver spends on `num_steps` steps (before guidance doubles them).

    For choosing steps from an NFE budget; `SampleResult.nfe_per_sample` is the counted figure.
    """
    _check_solver(solver)
    return 2 * num_steps - 1 if solver == "heun" else num_steps


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")


# ---------------------------------------------------------------------------------------------
# Guidance: what the solvers call


class GuidedDenoiser:
    """Turns a denoiser, its conditions and a guidance weight w into the `DenoiseFn` a solver
    calls, and counts what that costs.

    Without `guide`: classifier-free guidance, D = D(x; null) + w (D(x; cond) - D(x; null)). The
    conditional and null passes run as ONE call on a batch of 2B (cond rows, then all-zero rows),
    one forward of the network instead of two. w = 1 is no guidance and skips the null pass;
    w = 0 is the unconditional model and skips the conditional pass.

    `null` replaces the all-zero null condition, e.g. by the condition with only some parts
    dropped: then w weighs those parts alone (w = 0 keeps the rest).

    With `guide` (autoguidance, Karras et al. 2024): D = D_guide(x; cond) + w (D(x; cond) -
    D_guide(x; cond)), where the guide is a weaker model of the same data (a smaller or earlier
    one) and both see the same condition. w = 1 skips the guide, w = 0 uses the guide alone.

    `evaluations` counts network forward passes per sample so far: 1 per unguided call, 2 per
    guided call (a batched cond+null pass is two passes' work; an autoguidance step runs two
    networks, whatever the guide's size).

    The solver state may be float64; the network gets float32 x, sigma [B] and cond, and its
    output is cast back to the state's dtype before guidance is mixed in.
    """

    def __init__(self, denoiser: DenoiserProtocol, cond: Tensor | None, weight: float = 1.0,
                 guide: DenoiserProtocol | None = None, null: Tensor | None = None) -> None:
        if not math.isfinite(weight):
            raise ValueError(f"guidance weight must be finite, got {weight}")
        if guide is None and cond is None and weight != 1.0:
            raise ValueError("classifier-free guidance needs a condition to guide towards; with "
                             "cond=None use guidance 1 (or autoguidance with a guide model)")
        if cond is not None and cond.ndim != 2:
            raise ValueError(f"cond must be [batch, cond_dim], got shape {tuple(cond.shape)}")
        self.denoiser = denoiser
        self.cond = None if cond is None else cond.to(MODEL_DTYPE)
        self.weight = float(weight)
        self.guide = guide
        # What classifier-free guidance pushes away from: the all-zero (fully dropped)
        # condition by default, or e.g. the condition with only its pseudo part dropped.
        self.null = None if null is None else null.to(MODEL_DTYPE)
        self.evaluations = 0

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        if self.cond is not None and len(self.cond) != len(x):
            raise ValueError(f"{len(self.cond)} condition rows for a batch of {len(x)}")
        if self.weight == 1.0:
            return self._evaluate(self.denoiser, x, sigma, self.cond)
        if self.guide is not None:
            return self._autoguided(x, sigma)
        null = torch.zeros_like(self.cond) if self.null is None else self.null.to(self.cond.device)
        if self.weight == 0.0:
            return self._evaluate(self.denoiser, x, sigma, null)
        return self._classifier_free(x, sigma, null)

    def _classifier_free(self, x: Tensor, sigma: float, null: Tensor) -> Tensor:
        both = self._evaluate(self.denoiser, torch.cat([x, x]), sigma, torch.cat([self.cond, null]),
                              per_sample=2)
        conditional, unconditional = both.chunk(2)
        return unconditional + self.weight * (conditional - unconditional)

    def _autoguided(self, x: Tensor, sigma: float) -> Tensor:
        if self.weight == 0.0:
            return self._evaluate(self.guide, x, sigma, self.cond)
        main = self._evaluate(self.denoiser, x, sigma, self.cond)
        weak = self._evaluate(self.guide, x, sigma, self.cond)
        return weak + self.weight * (main - weak)

    def _evaluate(self, network: DenoiserProtocol, x: Tensor, sigma: float, cond: Tensor | None,
                  per_sample: int = 1) -> Tensor:
        """One forward pass in the network's dtype; `per_sample` is how many of the counted
        evaluations it stands for (2 for a cond+null batch of twice the samples)."""
        sigmas = torch.full((len(x),), sigma, dtype=MODEL_DTYPE, device=x.device)
        out = network(x.to(MODEL_DTYPE), sigmas, cond)
        self.evaluations += per_sample
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Starting noise and the one-call entry point


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...],
                  device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """Unit Gaussian noise [len(seeds), *shape], row i from a generator seeded with seeds[i].

    Drawn on the CPU in float64 whatever the target, then moved and cast: the same seed gives the
    same noise in any batch, at any position, on any device (CUDA's generator gives other numbers
    than the CPU's for one seed).
    """
    rows = []
    for seed in seeds:
        if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) < 2**64:
            raise ValueError(f"seeds must be integers in [0, 2**64), got {seed!r}")
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.randn(tuple(shape), generator=generator, dtype=torch.float64))
    if not rows:
        return torch.empty((0, *shape), dtype=dtype, device=device)
    return torch.stack(rows).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class SampleResult:
    images: Tensor        # float32 [B, C, H, W] on the sampling device, not clipped
    nfe_per_sample: int   # network forward passes per sample, guidance included
    sigmas: Tensor        # the schedule used (float64, trailing 0)


def sample(denoiser: DenoiserProtocol, cond: Tensor | None, seeds: Sequence[int], *,
           solver: str = "dpmpp2m", num_steps: int, guidance: float = 1.0,
           guide: DenoiserProtocol | None = None, image_shape: tuple[int, ...],
           sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
           device: torch.device | str | None = None,
           null: Tensor | None = None, start: Tensor | None = None) -> SampleResult:
    """Draw one image per seed (row i of `cond` conditions seed i) with the named solver.

    `guidance` is the weight w: classifier-free against the all-zero condition, or autoguidance
    against `guide` when one is given (see `GuidedDenoiser`). `device` defaults to the
    denoiser's (its first parameter's when it is an `nn.Module`), else the CPU. Runs without
    autograd and with the denoiser and guide in eval mode, restoring their modes afterwards.
    The images are returned as the ODE ends them: clipping to the data range is the caller's.

    `start` [B, C, H, W] (in the model's [-1, 1] units) starts each row from that image noised
    to `sigma_max` instead of from pure noise (SDEdit, Meng et al. 2022): the model's rendition
    of an image it is shown half-erased, which is how a memorising generator returns it.
    """
    _check_solver(solver)
    if len(seeds) == 0:
        raise ValueError("sample needs at least one seed")
    if cond is not None and len(cond) != len(seeds):
        raise ValueError(f"{len(cond)} condition rows for {len(seeds)} seeds")
    device = torch.device(device) if device is not None else _device_of(denoiser, cond)
    noise = initial_noise(seeds, image_shape, device, _state_dtype(device))
    if start is not None:
        if tuple(start.shape) != tuple(noise.shape):
            raise ValueError(f"start must be [{len(seeds)}, *image_shape], got "
                             f"{tuple(start.shape)}")
        noise = noise + start.to(noise) / sigma_max  # the solver starts at noise * sigma_max
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    if null is not None and (cond is None or null.shape != cond.shape):
        raise ValueError("the null condition must have the condition's shape")
    guided = GuidedDenoiser(denoiser, None if cond is None else cond.to(device), guidance, guide,
                            None if null is None else null.to(device))
    with torch.no_grad(), _eval_mode(denoiser, guide):
        images = SOLVERS[solver](guided, noise, sigmas)
    return SampleResult(images=images.to(torch.float32), nfe_per_sample=guided.evaluations,
                        sigmas=sigmas)


def _state_dtype(device: torch.device) -> torch.dtype:
    """float64 for the solver state, except where the backend has none (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _device_of(denoiser: DenoiserProtocol, cond: Tensor | None) -> torch.device:
    if isinstance(denoiser, nn.Module):
        parameter = next(denoiser.parameters(), None)
        if parameter is not None:
            return parameter.device
    return cond.device if cond is not None else torch.device("cpu")


@contextmanager
def _eval_mode(*networks: DenoiserProtocol | None) -> Iterator[None]:
    """Put every `nn.Module` among `networks` in eval mode, then give each submodule back the
    mode it had (a model may be training with some parts deliberately frozen in eval)."""
    saved = [(module, module.training) for network in networks if isinstance(network, nn.Module)
             for module in network.modules()]
    for network in networks:
        if isinstance(network, nn.Module):
            network.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
