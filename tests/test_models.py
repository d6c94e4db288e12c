"""The diffusion network: shapes, magnitude preservation, forced weight normalisation, the null
condition, batch independence, EDM preconditioning, the EDM2 loss and the learning-rate schedule.

Nets here are tiny (8-32 channels, 8-32 px) so the file runs in seconds on two CPU cores; the
properties tested do not depend on size.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from unpersonal.models import Denoiser, EDM2Loss, UNet, count_parameters, learning_rate
from unpersonal.models.conditioning import Conditioner
from unpersonal.models.unet import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def tiny_unet(resolution: int = 16, channels: int = 1, cond_dim: int = 3,
              **kwargs: object) -> UNet:
    options: dict[str, object] = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                      attn_resolutions=(8,), channels_per_head=8)
    options.update(kwargs)
    return UNet(resolution, channels, cond_dim, **options)  # type: ignore[arg-type]


def set_gains(module: nn.Module, value: float, names: tuple[str, ...] = ("emb_gain", "out_gain")
              ) -> None:
    """Give the zero-initialised gains a value, as training would, so the output is not 0."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.split(".")[-1] in names:
                parameter.fill_(value)


def rms(x: Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


# ---------------------------------------------------------------------------------------------
# Shapes and arguments


@pytest.mark.parametrize("resolution, channels, channel_mult", [
    (16, 1, (1, 2)),
    (32, 4, (1, 2, 2)),
    (8, 1, (1,)),
    (24, 4, (1, 2, 2, 2)),  # not a power of two: 24 / 8 = 3 px at the lowest level
])
def test_output_has_input_shape(resolution: int, channels: int, channel_mult: tuple[int, ...]
                                ) -> None:
    net = tiny_unet(resolution, channels, model_channels=8, channel_mult=channel_mult)
    set_gains(net, 1.0)
    x = torch.randn(2, channels, resolution, resolution)
    out = net(x, torch.zeros(2), torch.randn(2, 3))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_unconditional_net_has_no_cond_layer_and_ignores_none() -> None:
    net = tiny_unet(cond_dim=0)
    assert net.emb_cond is None
    assert net(torch.randn(2, 1, 16, 16), torch.zeros(2), None).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.ones(2, 3))


@pytest.mark.parametrize("resolution, channel_mult", [(18, (1, 2, 2)), (12, (1, 2, 2, 2))])
def test_resolution_not_divisible_by_downsampling_is_refused(
        resolution: int, channel_mult: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=f"{resolution} is not divisible by"):
        UNet(resolution, 1, 0, model_channels=8, channel_mult=channel_mult)


def test_wrong_input_shape_is_refused() -> None:
    net = tiny_unet()
    with pytest.raises(ValueError, match=r"expects input \[batch, 1, 16, 16\]"):
        net(torch.randn(2, 3, 16, 16), torch.zeros(2), None)
    with pytest.raises(ValueError, match=r"cond must be \[batch, 3\]"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# Magnitude preservation


def test_primitives_keep_unit_rms() -> None:
    a, b = torch.randn(4096, 64), torch.randn(4096, 64)
    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.03)
    assert rms(mp_sum(a, b, t=0.3)) == pytest.approx(1.0, abs=0.03)
    assert rms(mp_cat(a, b[:, :16], t=0.5)) == pytest.approx(1.0, abs=0.03)
    assert rms(MPFourier(256)(torch.randn(4096))) == pytest.approx(1.0, abs=0.05)
    assert rms(MPConv(64, 32)(a)) == pytest.approx(1.0, abs=0.1)
    image = torch.randn(16, 32, 16, 16)
    assert rms(MPConv(32, 48, (3, 3))(image)) == pytest.approx(1.0, abs=0.1)
    assert rms(normalize(image * 7.0)) == pytest.approx(1.0, abs=1e-3)


def test_mp_cat_gives_the_second_input_its_share() -> None:
    a, b = torch.randn(4096, 48), torch.randn(4096, 16)
    out = mp_cat(a, b, t=0.3)
    energy_a, energy_b = out[:, :48].pow(2).sum(), out[:, 48:].pow(2).sum()
    assert (energy_b / energy_a).sqrt().item() == pytest.approx(0.3 / 0.7, rel=0.05)


def test_activations_keep_unit_rms_through_the_encoder() -> None:
    net = tiny_unet(model_channels=32, num_blocks=2).eval()
    set_gains(net, 1.0, names=("emb_gain",))
    seen: dict[str, float] = {}
    for name, module in net.enc.items():
        module.register_forward_hook(
            lambda _module, _input, output, name=name: seen.__setitem__(name, rms(output)))
    net(torch.randn(8, 1, 16, 16), torch.randn(8), torch.randn(8, 3))
    assert set(seen) == set(net.enc)
    for name, value in seen.items():
        assert 0.7 < value < 1.3, f"{name}: RMS {value:.3f}"


# ---------------------------------------------------------------------------------------------
# Forced weight normalisation


def mp_convs(net: nn.Module) -> list[MPConv]:
    return [module for module in net.modules() if isinstance(module, MPConv)]


def test_train_forward_renormalises_every_weight_row() -> None:
    net = tiny_unet().train()
    with torch.no_grad():  # push weights off the unit sphere, as optimiser steps do
        for conv in mp_convs(net):
            conv.weight.mul_(3.0)
    net(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.randn(2, 3))
    for conv in mp_convs(net):
        row_rms = conv.weight.flatten(1).norm(dim=1) / math.sqrt(conv.fan_in)
        torch.testing.assert_close(row_rms, torch.ones_like(row_rms), atol=1e-3, rtol=0)


def test_eval_forward_leaves_weights_alone_and_ignores_their_scale() -> None:
    net = tiny_unet().eval()
    set_gains(net, 1.0)
    x, noise, cond = torch.randn(2, 1, 16, 16), torch.zeros(2), torch.randn(2, 3)
    before = net(x, noise, cond)
    with torch.no_grad():
        for conv in mp_convs(net):
            conv.weight.mul_(3.0)
    stored = [conv.weight.detach().clone() for conv in mp_convs(net)]
    after = net(x, noise, cond)
    for conv, weight in zip(mp_convs(net), stored):
        assert torch.equal(conv.weight, weight)
    # Not exact: normalize's eps (1e-4 of a unit-RMS row) weighs differently at 3x the scale.
    torch.testing.assert_close(after, before, atol=1e-2, rtol=1e-2)


def test_two_train_forwards_before_one_backward() -> None:
    """Summed losses of two micro-batches: the second in-place renormalisation must not break
    the first graph's backward."""
    net = tiny_unet().train()
    set_gains(net, 1.0)
    losses = [net(torch.randn(2, 1, 16, 16), torch.zeros(2), None).square().mean() for _ in "ab"]
    sum(losses).backward()
    assert net.out_conv.weight.grad is not None
    assert torch.isfinite(net.out_conv.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# Zero-initialised gains and the condition


def test_output_is_exactly_zero_at_init_and_not_after_one_step() -> None:
    net = tiny_unet().train()
    x, noise, cond = torch.randn(4, 1, 16, 16), torch.randn(4), torch.randn(4, 3)
    assert torch.equal(net(x, noise, cond), torch.zeros_like(x))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    (net(x, noise, cond) - 1.0).square().mean().backward()
    optimizer.step()
    assert net(x, noise, cond).abs().max() > 0


def test_cond_is_ignored_until_emb_gain_is_nonzero() -> None:
    net = tiny_unet().eval()
    x, noise = torch.randn(2, 1, 16, 16), torch.zeros(2)
    cond_a, cond_b = torch.randn(2, 3), torch.randn(2, 3)
    set_gains(net, 1.0, names=("out_gain",))
    torch.testing.assert_close(net(x, noise, cond_a), net(x, noise, cond_b), atol=0, rtol=0)
    set_gains(net, 1.0)
    assert (net(x, noise, cond_a) - net(x, noise, cond_b)).abs().max() > 1e-3


def test_cond_none_is_the_all_zero_condition() -> None:
    net = tiny_unet().eval()
    set_gains(net, 1.0)
    x, noise = torch.randn(3, 1, 16, 16), torch.randn(3)
    assert torch.equal(net(x, noise, None), net(x, noise, torch.zeros(3, 3)))
    assert (net(x, noise, None) - net(x, noise, torch.ones(3, 3))).abs().max() > 1e-3


def test_sample_output_does_not_depend_on_the_rest_of_its_batch() -> None:
    net = tiny_unet().eval()  # with attention at 8 px
    set_gains(net, 1.0)
    x, noise, cond = torch.randn(5, 1, 16, 16), torch.randn(5), torch.randn(5, 3)
    alone = net(x[:1], noise[:1], cond[:1])
    in_batch = net(x, noise, cond)[:1]
    assert alone.abs().max() > 1e-3
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Denoiser


class ConstantNet(nn.Module):
    """Stands in for the UNet: records what it is given and returns a constant."""

    cond_dim = 0
    img_channels = 1
    img_resolution = 4

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.seen: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, noise_labels: Tensor, cond: Tensor | None) -> Tensor:
        self.seen = (x, noise_labels)
        return torch.full_like(x, self.value)


# sigma -> (c_skip, c_out, c_in, c_noise) for sigma_data = 0.5, worked out by hand
EDM_CONSTANTS = {
    0.5: (0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4),
    2.0: (0.25 / 4.25, 1.0 / math.sqrt(4.25), 1 / math.sqrt(4.25), math.log(2.0) / 4),
}


def test_preconditioning_constants_match_edm() -> None:
    denoiser = Denoiser(tiny_unet(), sigma_data=0.5)
    sigmas = torch.tensor(list(EDM_CONSTANTS))
    got = torch.stack(denoiser.preconditioning(sigmas), dim=1)
    torch.testing.assert_close(got, torch.tensor(list(EDM_CONSTANTS.values())), atol=1e-6, rtol=0)


def test_denoiser_is_c_skip_x_when_the_net_outputs_zero() -> None:
    denoiser = Denoiser(tiny_unet())  # out_gain is 0 at init: the UNet outputs exactly 0
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 2.0])
    c_skip = torch.tensor([EDM_CONSTANTS[0.5][0], EDM_CONSTANTS[2.0][0]]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x, sigma), c_skip * x, atol=1e-6, rtol=0)


def test_denoiser_scales_net_input_and_output() -> None:
    net = ConstantNet(3.0)
    denoiser = Denoiser(net)  # type: ignore[arg-type]
    x = torch.randn(1, 1, 4, 4)
    c_skip, c_out, c_in, c_noise = EDM_CONSTANTS[2.0]
    denoised = denoiser(x, torch.tensor(2.0))  # a scalar sigma serves the whole batch
    assert net.seen is not None
    torch.testing.assert_close(net.seen[0], c_in * x)
    torch.testing.assert_close(net.seen[1], torch.tensor([c_noise]))
    torch.testing.assert_close(denoised, c_skip * x + c_out * 3.0)


def test_denoiser_refuses_nonpositive_sigma() -> None:
    with pytest.raises(ValueError, match="sigma must be > 0"):
        Denoiser(tiny_unet())(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 0.0]))


def test_denoiser_returns_float32_and_logvar_per_sample() -> None:
    denoiser = Denoiser(tiny_unet())
    denoised, logvar = denoiser(torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.ones(3),
                                torch.randn(3, 3), return_logvar=True)
    assert denoised.dtype == torch.float32 and denoised.shape == (3, 1, 16, 16)
    assert logvar.shape == (3, 1, 1, 1)
    assert denoiser.cond_dim == 3


# ---------------------------------------------------------------------------------------------
# Loss, schedule, and a training step


def test_loss_is_finite_per_sample_and_reproducible() -> None:
    denoiser = Denoiser(tiny_unet()).eval()  # train mode would renormalise weights per call
    images, cond = torch.randn(4, 1, 16, 16) * 0.5, torch.randn(4, 3)
    loss = EDM2Loss()
    first = loss(denoiser, images, cond, torch.Generator().manual_seed(7))
    again = loss(denoiser, images, cond, torch.Generator().manual_seed(7))
    other = loss(denoiser, images, cond, torch.Generator().manual_seed(8))
    assert first.shape == (4,)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_loss_is_the_uncertainty_weighted_edm_error() -> None:
    """With D = 0 and u = 0.7: weight(sigma) * exp(-0.7) * mean(y^2) + 0.7 per image."""
    def zero_denoiser(x: Tensor, sigma: Tensor, cond: Tensor | None, return_logvar: bool,
                      sigma_checked: bool = False) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), torch.full((len(x), 1, 1, 1), 0.7)

    images = torch.randn(3, 2, 4, 4)
    loss = EDM2Loss(p_mean=-0.4, p_std=1.0, sigma_data=0.5)
    generator = torch.Generator().manual_seed(5)
    got = loss(zero_denoiser, images, None, generator)  # type: ignore[arg-type]
    sigma = (torch.randn(3, generator=torch.Generator().manual_seed(5)) - 0.4).exp()
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight * math.exp(-0.7) * images.square().mean(dim=(1, 2, 3)) + 0.7
    torch.testing.assert_close(got, expected)


def test_loss_decreases_when_fitting_a_constant_image() -> None:
    denoiser = Denoiser(tiny_unet(resolution=8, cond_dim=0, model_channels=8, channel_mult=(1,),
                                  attn_resolutions=())).train()
    images = torch.full((8, 1, 8, 8), 0.4)
    loss = EDM2Loss()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-2, betas=(0.9, 0.99))

    def held_out_loss() -> float:  # the same sigmas and noise every time
        with torch.no_grad():
            return loss(denoiser, images, None, torch.Generator().manual_seed(123)).mean().item()

    before = held_out_loss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        optimizer.zero_grad()
        loss(denoiser, images, None, generator).mean().backward()
        optimizer.step()
    assert held_out_loss() < before - 0.5


def test_learning_rate_warms_up_holds_then_decays() -> None:
    def lr(step: int) -> float:
        return learning_rate(step, ref_lr=1.0, ref_steps=100, warmup_steps=10)

    assert lr(0) == pytest.approx(0.1)
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == lr(50) == lr(100) == pytest.approx(1.0)
    assert lr(400) == pytest.approx(0.5)
    assert lr(1600) == pytest.approx(0.25)
    assert learning_rate(10_000, ref_lr=0.01, ref_steps=0) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        learning_rate(-1, ref_lr=1.0, ref_steps=100)


def test_tiny_model_trains_one_step_on_a_batch() -> None:
    denoiser = Denoiser(UNet(16, 1, 2, model_channels=16, channel_mult=(1, 2), num_blocks=1)
                        ).train()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-2)
    loss = EDM2Loss()(denoiser, torch.rand(4, 1, 16, 16) * 2 - 1, torch.randn(4, 2))
    loss.mean().backward()
    gradients = [p.grad for p in denoiser.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert denoiser.net.out_gain.grad is not None and denoiser.net.out_gain.grad.abs() > 0
    optimizer.step()
    assert denoiser.net.out_gain.item() != 0


def test_count_parameters_counts_parameters_not_buffers() -> None:
    assert count_parameters(nn.Linear(3, 2)) == 8
    net = tiny_unet()
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())
    assert count_parameters(MPFourier(16)) == 0


def test_the_null_condition_against_the_labels_keeps_the_labels_and_drops_the_pseudo_part(
        ) -> None:
    both = Conditioner("class+pseudo", label_dim=2, pseudo_dim=3)
    codes, pseudo = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.randn(2, 3)
    null = both.null(codes, pseudo, "labels")
    assert torch.equal(null[:, :2], both.build(codes, pseudo)[:, :2])
    assert torch.equal(null[:, 2:], torch.zeros(2, 3))
    assert both.null(codes, pseudo, "empty") is None  # the all-zero condition
    # Told the labels alone, its null against the labels is its condition: w changes nothing.
    labels_only = Conditioner("class", label_dim=2, pseudo_dim=0)
    assert torch.equal(labels_only.null(codes, None, "labels"), labels_only.build(codes, None))
    assert labels_only.null(codes, None, "empty") is None
