"""Samplers against exact answers: denoisers whose D(x; sigma) is known in closed form.

For data ~ N(mu, s^2) per pixel the posterior mean is mu + s^2 / (s^2 + sigma^2) (x - mu), and the
probability-flow ODE has the closed-form solution x(sigma) - mu = (x(sigma_max) - mu)
sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2). For a mixture of two such Gaussians (two "modes",
whole images mu_a and mu_b) the posterior mean is the responsibility-weighted mix of the two
Gaussian posterior means; a condition row shifts the mode weights, which is what guidance acts on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from unpersonal.config import SamplingConfig
from unpersonal.models.conditioning import Conditioner, label_code
from unpersonal.sampling import (
    GuidedDenoiser,
    dpmpp_2m_sample,
    heun_sample,
    initial_noise,
    karras_sigmas,
    sample,
    solver_evaluations,
)
from unpersonal.sampling.sampler import Sampler

SHAPE = (1, 8, 8)
SPREAD = 0.1                  # std of each mixture mode around its mean image
CLASS_WEIGHTS = ((0.8, 0.2),  # cond [1, 0]: mostly mode A
                 (0.2, 0.8))  # cond [0, 1]: mostly mode B
NULL_WEIGHTS = (0.5, 0.5)     # cond None or an all-zero row
CLASS_A = torch.tensor([1.0, 0.0])
CLASS_B = torch.tensor([0.0, 1.0])


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These tensors are tiny: on a busy 2-core machine, intra-op threads cost 100x the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Analytic denoisers


def _column(sigma: Tensor) -> Tensor:
    return sigma.to(torch.float64).view(-1, 1, 1, 1)


def _squared_distance(x: Tensor, mean: Tensor) -> Tensor:
    return ((x - mean) ** 2).sum((1, 2, 3), keepdim=True)


class GaussianData:
    """Exact D for data ~ N(mu, s^2) per pixel."""

    def __init__(self, mu: float = 0.2, s: float = 0.5) -> None:
        self.mu, self.s = mu, s

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        shrink = self.s**2 / (self.s**2 + _column(sigma) ** 2)
        return (self.mu + shrink * (x.to(torch.float64) - self.mu)).to(torch.float32)

    def exact_flow(self, noise: Tensor, sigma_max: float = 80.0) -> Tensor:
        """Where the ODE started at sigma_max * noise ends at sigma = 0."""
        start = noise * sigma_max
        return self.mu + (start - self.mu) * self.s / math.hypot(self.s, sigma_max)


class TwoModeData:
    """Exact D for a mixture of N(mu_a, s^2 I) and N(mu_b, s^2 I), images of SHAPE; the mode
    weights come from the condition row (CLASS_WEIGHTS) or are NULL_WEIGHTS for the null one."""

    def __init__(self, unconditional_weight_a: float = NULL_WEIGHTS[0]) -> None:
        g = torch.Generator().manual_seed(1)
        self.mu_a = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 1.6 - 0.8
        self.mu_b = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 1.6 - 0.8
        self.null_weight_a = unconditional_weight_a

    def weight_a(self, cond: Tensor | None, batch: int) -> Tensor:
        null = torch.full((batch,), self.null_weight_a, dtype=torch.float64)
        if cond is None:
            return null
        per_class = cond.to(torch.float64) @ torch.tensor([w[0] for w in CLASS_WEIGHTS],
                                                          dtype=torch.float64)
        return torch.where(cond.abs().sum(1) == 0, null, per_class)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        x = x.to(torch.float64)
        variance = SPREAD**2 + _column(sigma) ** 2
        weight_a = self.weight_a(cond, len(x)).view(-1, 1, 1, 1)
        log_a = weight_a.log() - _squared_distance(x, self.mu_a) / (2 * variance)
        log_b = (1 - weight_a).log() - _squared_distance(x, self.mu_b) / (2 * variance)
        resp_a = torch.sigmoid(log_a - log_b)  # posterior probability of mode A given x
        shrink = SPREAD**2 / variance
        mean_a = self.mu_a + shrink * (x - self.mu_a)
        mean_b = self.mu_b + shrink * (x - self.mu_b)
        return (resp_a * mean_a + (1 - resp_a) * mean_b).to(torch.float32)

    def share_in_mode_a(self, images: Tensor) -> float:
        images = images.to(torch.float64)
        nearer_a = _squared_distance(images, self.mu_a) < _squared_distance(images, self.mu_b)
        return nearer_a.double().mean().item()


class Spy:
    """A denoiser that records every call (batch size, sigma, cond, dtypes) before answering."""

    def __init__(self, denoiser) -> None:
        self.denoiser = denoiser
        self.calls: list[dict] = []

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        self.calls.append({"batch": len(x), "x_dtype": x.dtype, "sigma": sigma.clone(),
                           "cond": None if cond is None else cond.clone()})
        return self.denoiser(x, sigma, cond)


def conds(*rows: Tensor) -> Tensor:
    return torch.stack(rows)


def rms(a: Tensor, b: Tensor) -> float:
    return (a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt().item()


def solve_directly(solver, denoise, seeds: list[int], num_steps: int) -> Tensor:
    """Run a solver on a plain function, without sample() or GuidedDenoiser in between."""
    return solver(denoise, initial_noise(seeds, SHAPE), karras_sigmas(num_steps)).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Schedule


def test_karras_sigmas_run_from_sigma_max_to_sigma_min_then_zero() -> None:
    sigmas = karras_sigmas(32)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 33
    assert sigmas[0].item() == 80.0 and sigmas[-2].item() == 0.002 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # EDM eq. 5 at step 16 of 32, by hand
    expected = (80 ** (1 / 7) + 16 / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[16].item() == pytest.approx(expected, rel=1e-12)
    custom = karras_sigmas(5, sigma_min=0.01, sigma_max=10.0, rho=3.0)
    assert custom.tolist()[0] == 10.0 and custom.tolist()[-2:] == [0.01, 0.0]
    assert karras_sigmas(1).tolist() == [80.0, 0.0]


@pytest.mark.parametrize("arguments", [(0,), (8, 0.0), (8, 1.0, 0.5), (8, 0.002, 80.0, 0.0)])
def test_karras_sigmas_refuses_impossible_schedules(arguments: tuple) -> None:
    with pytest.raises(ValueError):
        karras_sigmas(*arguments)


# ---------------------------------------------------------------------------------------------
# Both solvers on the Gaussian: right distribution, right cost


@pytest.mark.parametrize(("solver", "steps", "nfe"), [("heun", 32, 63), ("dpmpp2m", 24, 24)])
def test_solvers_draw_the_gaussian_they_were_given(solver: str, steps: int, nfe: int) -> None:
    data = GaussianData(mu=0.2, s=0.5)
    result = sample(data, None, range(4000), solver=solver, num_steps=steps, image_shape=(1, 4, 4))
    assert result.nfe_per_sample == nfe == solver_evaluations(solver, steps)
    assert result.images.dtype == torch.float32 and result.images.shape == (4000, 1, 4, 4)
    assert result.images.mean().item() == pytest.approx(0.2, abs=0.01)
    assert result.images.std().item() == pytest.approx(0.5, rel=0.05)
    assert result.images.max().item() > 1.0  # not clipped: that is the caller's decision


def test_heun_reference_follows_the_exact_flow() -> None:
    """The 256-step Heun run that the accuracy test trusts is within 1e-3 of the exact ODE end
    (measured 4.6e-4, falling 4x per doubling of steps): far below the errors it judges."""
    data, seeds = GaussianData(), list(range(64))
    exact = data.exact_flow(initial_noise(seeds, SHAPE))
    reference = sample(data, None, seeds, solver="heun", num_steps=256, image_shape=SHAPE).images
    assert (reference - exact).abs().max().item() < 1e-3


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
@pytest.mark.parametrize("solver", ["heun", "dpmpp2m"])
def test_each_denoiser_call_is_counted(solver: str, steps: int) -> None:
    spy = Spy(GaussianData())
    result = sample(spy, None, [0, 1, 2], solver=solver, num_steps=steps, image_shape=SHAPE)
    expected = 2 * steps - 1 if solver == "heun" else steps
    assert len(spy.calls) == result.nfe_per_sample == expected
    # the protocol: float32 x, one float32 sigma per sample, the whole batch at once
    assert all(c["batch"] == 3 and c["x_dtype"] == torch.float32 for c in spy.calls)
    assert all(c["sigma"].dtype == torch.float32 and c["sigma"].shape == (3,) for c in spy.calls)
    assert spy.calls[0]["sigma"][0].item() == 80.0
    assert all(bool((c["sigma"] > 0).all()) for c in spy.calls)  # D(x; 0) is never asked for


# ---------------------------------------------------------------------------------------------
# Accuracy against NFE


ACCURACY_BOUNDS = {  # RMS error (data units) against Heun 256 steps; measured values in comments
    "two modes": {10: 0.12, 16: 0.02, 24: 0.01},  # measured 0.070, 0.0100, 0.0050
    "gaussian": {10: 0.12, 16: 0.06, 24: 0.025},  # measured 0.080, 0.0403, 0.0163
}


@pytest.mark.parametrize("problem", sorted(ACCURACY_BOUNDS))
def test_dpmpp_2m_error_shrinks_with_steps_and_is_small_at_16_to_24(problem: str) -> None:
    data = TwoModeData(unconditional_weight_a=0.3) if problem == "two modes" else GaussianData()
    seeds = list(range(64))
    reference = sample(data, None, seeds, solver="heun", num_steps=256, image_shape=SHAPE).images
    errors = {steps: rms(sample(data, None, seeds, solver="dpmpp2m", num_steps=steps,
                                image_shape=SHAPE).images, reference)
              for steps in ACCURACY_BOUNDS[problem]}
    assert errors[10] > errors[16] > errors[24], errors
    for steps, bound in ACCURACY_BOUNDS[problem].items():
        assert errors[steps] < bound, (steps, errors)
    # the point of the fast solver: at about the same NFE it beats Heun clearly
    heun_15_nfe = sample(data, None, seeds, solver="heun", num_steps=8, image_shape=SHAPE).images
    assert errors[16] < 0.5 * rms(heun_15_nfe, reference)


# ---------------------------------------------------------------------------------------------
# Seeds


@pytest.mark.parametrize("solver", ["heun", "dpmpp2m"])
def test_an_image_depends_on_its_seed_and_condition_not_its_batch(solver: str) -> None:
    data = TwoModeData()
    together = sample(data, conds(CLASS_A, CLASS_B, CLASS_A), [5, 6, 7], solver=solver,
                      num_steps=12, guidance=2.0, image_shape=SHAPE).images
    alone = sample(data, conds(CLASS_B), [6], solver=solver, num_steps=12, guidance=2.0,
                   image_shape=SHAPE).images
    assert (together[1] - alone[0]).abs().max().item() <= 1e-6
    assert (together[0] - together[2]).abs().max().item() > 0.1  # other seeds, other images


def test_initial_noise_is_per_seed_whatever_the_batch_or_dtype() -> None:
    batch = initial_noise([3, 9, 3], SHAPE)
    assert batch.dtype == torch.float64 and batch.shape == (3, *SHAPE)
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(initial_noise([9], SHAPE)[0], batch[1])
    as_float = initial_noise([3, 9], SHAPE, "cpu", torch.float32)
    assert torch.equal(as_float, batch[:2].to(torch.float32))
    assert initial_noise([], SHAPE).shape == (0, *SHAPE)
    # drawn in float64 on the CPU generator: the contract that keeps old seeds' images
    reference = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.equal(batch[1], reference)
    for bad in (-1, 2.5, True, 2**64):
        with pytest.raises(ValueError):
            initial_noise([bad], SHAPE)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_guidance_one_never_calls_the_null_condition() -> None:
    data = TwoModeData()
    spy = Spy(data)
    cond = conds(CLASS_A, CLASS_B)
    result = sample(spy, cond, [1, 2], solver="dpmpp2m", num_steps=10, guidance=1.0,
                    image_shape=SHAPE)
    assert len(spy.calls) == result.nfe_per_sample == 10
    assert all(c["batch"] == 2 and torch.equal(c["cond"], cond) for c in spy.calls)
    conditional = solve_directly(
        dpmpp_2m_sample, lambda x, s: data(x, torch.full((len(x),), s), cond).double(), [1, 2], 10)
    assert torch.allclose(result.images, conditional, atol=1e-6)


def test_guided_steps_batch_cond_and_null_into_one_call_that_costs_two() -> None:
    data = TwoModeData()
    spy = Spy(data)
    cond = conds(CLASS_A, CLASS_B, CLASS_A)
    result = sample(spy, cond, [1, 2, 3], solver="heun", num_steps=6, guidance=2.0,
                    image_shape=SHAPE)
    assert len(spy.calls) == 11 and result.nfe_per_sample == 22  # 2 * (2 * 6 - 1)
    for call in spy.calls:
        assert call["batch"] == 6
        assert torch.equal(call["cond"][:3], cond) and not call["cond"][3:].any()

    def by_hand(x: Tensor, sigma: float) -> Tensor:
        sigmas = torch.full((len(x),), sigma)
        null = data(x, sigmas, None).double()
        return null + 2.0 * (data(x, sigmas, cond).double() - null)

    assert torch.allclose(result.images, solve_directly(heun_sample, by_hand, [1, 2, 3], 6),
                          atol=1e-5)


def test_guidance_zero_is_the_unconditional_model() -> None:
    data = TwoModeData()
    spy = Spy(data)
    guided_to_nothing = sample(spy, conds(CLASS_A, CLASS_B), [4, 5], num_steps=10, guidance=0.0,
                               image_shape=SHAPE)
    unconditional = sample(data, None, [4, 5], num_steps=10, image_shape=SHAPE)
    assert torch.allclose(guided_to_nothing.images, unconditional.images, atol=1e-6)
    assert guided_to_nothing.nfe_per_sample == 10
    assert all(not c["cond"].any() for c in spy.calls)


def test_guidance_moves_samples_towards_the_conditioned_mode() -> None:
    """Class A puts 80% of its images in mode A, the null condition 50%; w > 1 goes beyond 80%."""
    data, seeds = TwoModeData(), list(range(400))
    cond = CLASS_A.expand(len(seeds), 2)
    share = {w: data.share_in_mode_a(sample(data, cond, seeds, num_steps=16, guidance=w,
                                            image_shape=SHAPE).images)
             for w in (0.0, 1.0, 3.0)}
    assert share[0.0] == pytest.approx(0.5, abs=0.07)
    assert share[1.0] == pytest.approx(0.8, abs=0.06)
    assert share[3.0] > share[1.0] + 0.05


def test_classifier_free_guidance_without_a_condition_is_refused() -> None:
    with pytest.raises(ValueError, match="condition"):
        sample(GaussianData(), None, [0], num_steps=4, guidance=2.0, image_shape=SHAPE)


# ---------------------------------------------------------------------------------------------
# Autoguidance


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0, 3.0])
def test_autoguidance_by_the_model_itself_changes_nothing(weight: float) -> None:
    data = TwoModeData()
    cond = conds(CLASS_A, CLASS_B)
    plain = sample(data, cond, [8, 9], num_steps=10, image_shape=SHAPE)
    self_guided = sample(data, cond, [8, 9], num_steps=10, guidance=weight, guide=data,
                         image_shape=SHAPE)
    assert torch.allclose(plain.images, self_guided.images, atol=1e-6)
    assert self_guided.nfe_per_sample == (10 if weight == 0.0 else 20)


def test_autoguidance_extrapolates_from_the_guide_to_the_main_model() -> None:
    main = Spy(lambda x, sigma, cond: torch.full_like(x, 3.0))
    weak = Spy(lambda x, sigma, cond: torch.full_like(x, 1.0))
    cond = conds(CLASS_A, CLASS_B)
    guided = GuidedDenoiser(main, cond, weight=2.5, guide=weak)
    out = guided(torch.zeros(2, *SHAPE, dtype=torch.float64), 1.0)
    assert torch.allclose(out, torch.full_like(out, 1.0 + 2.5 * (3.0 - 1.0)))
    assert out.dtype == torch.float64 and guided.evaluations == 2
    assert torch.equal(main.calls[0]["cond"], cond) and torch.equal(weak.calls[0]["cond"], cond)


# ---------------------------------------------------------------------------------------------
# Module handling and refusals


class LinearDenoiser(nn.Module):
    """An nn.Module denoiser that records the mode and autograd state it is called in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.frozen = nn.Dropout(0.5).eval()  # a part its owner keeps in eval while training
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.scale * x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def test_sampling_runs_in_eval_mode_without_autograd_and_restores_modes() -> None:
    main, guide = LinearDenoiser().train(), LinearDenoiser().train()
    main.frozen.eval()
    result = sample(main, conds(CLASS_A), [0], num_steps=5, guidance=2.0, guide=guide,
                    image_shape=SHAPE)
    assert main.seen and guide.seen
    assert all(seen == (False, False) for seen in main.seen + guide.seen)
    assert main.training and guide.training and not main.frozen.training
    assert result.images.device == main.scale.device and not result.images.requires_grad


def test_sample_refuses_mismatched_or_unknown_input() -> None:
    with pytest.raises(ValueError, match="solver"):
        sample(GaussianData(), None, [0], solver="euler", num_steps=4, image_shape=SHAPE)
    with pytest.raises(ValueError, match="condition rows"):
        sample(GaussianData(), conds(CLASS_A), [0, 1], num_steps=4, image_shape=SHAPE)
    with pytest.raises(ValueError, match="seed"):
        sample(GaussianData(), None, [], num_steps=4, image_shape=SHAPE)
    with pytest.raises(ValueError, match="decreasing"):
        dpmpp_2m_sample(lambda x, s: x, torch.zeros(1, *SHAPE),
                        torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# The sampler: a model and the training rows' conditions, drawing in batches


class LabelledMeans:
    """Exact D for N(mu, 0.1^2) per pixel, mu +0.5 for a row labelled 1 and -0.5 for 0 (read
    off the binary label code, (1 - y, y) scaled to unit RMS)."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        mu = (0.5 * (cond[:, 1] - cond[:, 0]) / math.sqrt(2)).to(torch.float64).view(-1, 1, 1, 1)
        shrink = 0.01 / (0.01 + _column(sigma) ** 2)
        return (mu + shrink * (x.to(torch.float64) - mu)).to(torch.float32)


def _sampler(batch_size: int) -> Sampler:
    labels = np.array([[0], [1], [0]], np.uint8)
    return Sampler(LabelledMeans(), None, Conditioner("class", 2, 0),
                   torch.from_numpy(label_code(labels, "binary")), torch.zeros(3, 0),
                   SamplingConfig(steps=6, batch_size=batch_size), 8,
                   {"channels": 1, "resolution": SHAPE[-1]}, torch.device("cpu"))


def test_the_sampler_draws_each_row_from_its_seed_and_condition_whatever_the_batch() -> None:
    rows, seeds = np.array([0, 1, 2, 1]), [3, 4, 5, 4]
    one_batch = _sampler(batch_size=4).draw(rows, seeds, guidance=1.0)
    one_by_one = _sampler(batch_size=1).draw(rows, seeds, guidance=1.0)
    assert one_batch.images.dtype == np.uint8 and one_batch.images.shape == (4, 8, 8)
    np.testing.assert_array_equal(one_batch.images, one_by_one.images)
    assert one_batch.evaluations == one_by_one.evaluations == 6 * 4
    np.testing.assert_array_equal(one_batch.images[1], one_batch.images[3])  # same row and seed
    means = one_batch.images.reshape(4, -1).mean(axis=1)
    assert means[1] > 150 > 100 > means[0] and means[2] < 100  # label 1 bright, label 0 dark


# ---------------------------------------------------------------------------------------------
# Cross-check with diffusers


@pytest.mark.parametrize("steps", [10, 16, 24])
def test_dpmpp_2m_matches_diffusers_edm_dpm_solver(steps: int) -> None:
    """diffusers' EDMDPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, Karras sigmas,
    final sigma 0, first-order last step) is the same algorithm; it works in float32, so the two
    agree to float32 round-off, not exactly."""
    import diffusers  # a test dependency (pyproject): never skipped
    data, seeds = TwoModeData(unconditional_weight_a=0.3), list(range(64))
    ours = sample(data, None, seeds, solver="dpmpp2m", num_steps=steps, image_shape=SHAPE).images

    scheduler = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    assert torch.allclose(scheduler.sigmas.double(), karras_sigmas(steps), rtol=1e-5)
    x = initial_noise(seeds, SHAPE, dtype=torch.float32) * 80.0
    for index, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[index]
        denoised = data(x, sigma.expand(len(x)), None)
        # diffusers wants the raw network output F with D = c_skip x + c_out F (EDM eq. 7)
        c_skip = 0.25 / (sigma**2 + 0.25)
        c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        x = scheduler.step((denoised - c_skip * x) / c_out, timestep, x).prev_sample
    assert (ours - x).abs().max().item() < 2e-5
