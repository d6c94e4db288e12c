"""A magnitude-preserving UNet, after EDM2 (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models").

Why this design: every layer keeps the RMS of its activations and of its weights at about one, so
training needs no normalisation across the batch, no weight decay and no per-layer learning-rate
tuning. That matters here twice: runs are small (a hospital's CPU, a few thousand images), where a
badly scaled net wastes most of its steps; and no layer mixes the samples of a batch (no
BatchNorm, no GroupNorm over the batch), so an image's output never depends on which other
patients' images share its batch, and generation gives the same images whatever the batch size.

The net makes no assumption about what it is fed: grey pixels today, a latent autoencoder's 4+
channels later. Its only inputs are the noisy image, the noise level (already mapped to
`log(sigma) / 4` by the preconditioning in `edm.py`) and one conditioning vector per sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SILU_RMS = 0.596  # RMS of silu(x) for x ~ N(0, 1): dividing by it keeps unit magnitude
NORM_EPS = 1e-4


# ---------------------------------------------------------------------------------------------
# Magnitude-preserving primitives


def normalize(x: Tensor, dim: int | Sequence[int] | None = None, eps: float = NORM_EPS) -> Tensor:
    """Scale `x` to unit RMS over `dim` (default: all but the first), so its norm is sqrt(size)."""
    if dim is None:
        dim = tuple(range(1, x.ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    size = math.prod(x.shape[d] for d in dims)
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    return x / (eps + norm / math.sqrt(size)).to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """SiLU rescaled so a unit-variance input gives a unit-RMS output."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Blend `a` (t=0) and `b` (t=1) so that two unit-RMS, uncorrelated inputs give unit RMS."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenate with weights that keep unit RMS and give `b` the share `t` of the total."""
    size_a, size_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((size_a + size_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(size_a)),
                      b * (scale * t / math.sqrt(size_b))], dim=dim)


def resample(x: Tensor, mode: str) -> Tensor:
    """Halve the resolution by 2x2 averaging ('down'), double it by repetition ('up'), or not."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "keep":
        return x
    raise ValueError(f"resample mode must be 'down', 'up' or 'keep', not {mode!r}")


class MPFourier(nn.Module):
    """Random Fourier features of a scalar per sample (the noise level), unit RMS per feature."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        # Buffers, not parameters: fixed at init and saved with the weights, so a reloaded model
        # embeds noise levels exactly as the trained one did.
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x.to(torch.float32).reshape(-1), self.freqs) + self.phases
        return angles.cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Convolution (kernel (k, k)) or linear layer (kernel ()) with unit-norm weights.

    In training mode the stored weight is renormalised in place before every forward ("forced
    weight normalisation"): the optimiser's steps then change only directions, so the effective
    learning rate does not shrink as weights grow, and no weight decay is needed. The forward
    normalises again (differentiably) and divides by sqrt(fan_in), so a unit-RMS input gives a
    unit-RMS output; `gain` scales the result (zero-initialised gains make a layer start silent).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = ()) -> None:
        super().__init__()
        if len(kernel) not in (0, 2):
            raise ValueError(f"MPConv kernel must be () for linear or (k, k), not {tuple(kernel)}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        # A clone, so the graph keeps its own copy: a second forward in train mode before
        # backward (gradient accumulation over summed losses) renormalises `self.weight` in place,
        # which would otherwise invalidate the tensors autograd saved from the first.
        weight = normalize(self.weight.clone()) * (gain / math.sqrt(self.fan_in))
        if weight.ndim == 2:
            return x @ weight.t()
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


@torch.no_grad()
def renormalize_weights(module: nn.Module) -> None:
    """Forced weight normalisation of every MPConv in `module`, as a forward in training mode
    does: for trainers that take gradients in eval mode (per-patient gradients through
    `torch.func`, where the in-place renormalisation cannot run)."""
    for layer in module.modules():
        if isinstance(layer, MPConv):
            layer.weight.copy_(normalize(layer.weight))


# ---------------------------------------------------------------------------------------------
# Blocks


class Block(nn.Module):
    """One UNet block: residual unit modulated by the embedding, then optional self-attention.

    'enc' blocks project and pixel-normalise the input before the residual unit, so every encoder
    output starts from unit RMS per pixel; 'dec' blocks feed their input (a concatenation whose
    balance `mp_cat` already set) straight to the residual unit and project it with a 1x1 conv
    only on the main path.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256.0) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', not {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.num_heads = _num_heads(out_channels, channels_per_head) if attention else 0
        # Zero: at init the embedding does not modulate the block, so the net starts as a plain
        # (unconditional, noise-blind) magnitude-preserving UNet and learns how much to listen.
        self.emb_gain = nn.Parameter(torch.zeros([]))
        res0_in = out_channels if flavor == "enc" else in_channels
        self.conv_res0 = MPConv(res0_in, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = (MPConv(in_channels, out_channels, (1, 1))
                          if in_channels != out_channels else None)
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: per sample and pixel, never across the batch
        # mp_sum(x, y, t) = x (1-t)/c + y t/c with c = sqrt((1-t)^2 + t^2). The factor t/c rides
        # on conv_res1's weight gain and (1-t)/c on torch.add's alpha: one pass over the
        # activations instead of lerp-then-divide's two (benchmarks/diffusion_throughput.py).
        t = self.res_balance
        norm = math.sqrt((1 - t) ** 2 + t ** 2)
        y = self._residual(x, emb, out_gain=t / norm)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = torch.add(y, x, alpha=(1 - t) / norm)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        # The clip guards half-precision overflow (EDM2 trains in fp16). In float32 unit-RMS
        # activations never come near it, and the clamp would cost a pass forward and backward.
        if self.clip_act is not None and x.dtype in (torch.float16, torch.bfloat16):
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _residual(self, x: Tensor, emb: Tensor, out_gain: float = 1.0) -> Tensor:
        """conv - (scale by 1 + embedding) - conv: the embedding reaches every block this way.

        mp_silu's 1/0.596 is folded into the next convolution's gain (a scalar on a small weight
        instead of a pass over the activations); the numbers are those of EDM2's formulation.
        """
        y = self.conv_res0(F.silu(x), gain=1 / SILU_RMS)
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = F.silu(y * scale[:, :, None, None])
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        return self.conv_res1(y, gain=out_gain / SILU_RMS)

    def _attention(self, x: Tensor) -> Tensor:
        """Multi-head self-attention over pixels, with pixel-normalised queries and keys."""
        batch, channels, height, width = x.shape
        qkv = self.attn_qkv(x).reshape(batch, self.num_heads, 3, channels // self.num_heads, -1)
        q, k, v = normalize(qkv, dim=3).transpose(-1, -2).unbind(2)  # each [B, heads, HW, c]
        # The fused kernel equals softmax(q k^T / sqrt(c)) v written out (EDM2's scale) to 1e-6
        # and is about 1.5x faster forward+backward on a 2-core CPU.
        y = F.scaled_dot_product_attention(q, k, v)
        return self.attn_proj(y.transpose(-1, -2).reshape(batch, channels, height, width))


def _num_heads(channels: int, channels_per_head: int) -> int:
    """At least one head, even when a small net has fewer channels than `channels_per_head`."""
    heads = max(1, channels // channels_per_head)
    if channels % heads:
        raise ValueError(f"{channels} channels cannot be split into {heads} attention heads of "
                         f"{channels_per_head}; choose channels_per_head that divides it")
    return heads


# ---------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """F(x; noise level, cond): the raw network that `edm.Denoiser` preconditions.

    `cond` is one vector per sample ([B, cond_dim]) that the caller builds (labels, pseudo-labels,
    concatenated) and scales: for magnitude preservation its entries should have RMS about one
    (EDM2 feeds one-hot labels times sqrt(dim)). An all-zero vector, or `cond=None`, is the null
    condition used for classifier-free guidance. `cond_dim=0` makes the net unconditional.
    """

    def __init__(self, img_resolution: int, img_channels: int, cond_dim: int,
                 model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2),
                 num_blocks: int = 2, attn_resolutions: Sequence[int] = (8,),
                 dropout: float = 0.0, channels_per_head: int = 64,
                 label_balance: float = 0.5, concat_balance: float = 0.5) -> None:
        super().__init__()
        _check_shape_arguments(img_resolution, img_channels, cond_dim, model_channels,
                               channel_mult, num_blocks)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.cond_dim = cond_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        block_channels = [model_channels * mult for mult in channel_mult]
        noise_channels, emb_channels = block_channels[0], max(block_channels)
        attention_at = set(attn_resolutions)
        block = functools.partial(Block, emb_channels=emb_channels, dropout=dropout,
                                  channels_per_head=channels_per_head)

        # Zero: the net outputs exactly 0 at init, so the denoiser starts as c_skip * x (the best
        # guess that knows nothing), and the first steps do not fight a random output.
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels)
        self.emb_cond = MPConv(cond_dim, emb_channels) if cond_dim else None

        self.enc = nn.ModuleDict()
        channels = img_channels + 1  # + a constant channel: the only "bias" the net has
        for level, out_channels in enumerate(block_channels):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(channels, out_channels, (3, 3))
                channels = out_channels
            else:
                self.enc[f"{res}x{res}_down"] = block(channels, channels, flavor="enc",
                                                      resample_mode="down")
            for index in range(num_blocks):
                self.enc[f"{res}x{res}_block{index}"] = block(
                    channels, out_channels, flavor="enc", attention=res in attention_at)
                channels = out_channels

        self.dec = nn.ModuleDict()
        skip_channels = [_out_channels(module) for module in self.enc.values()]
        lowest_level = len(block_channels) - 1
        for level, out_channels in reversed(list(enumerate(block_channels))):
            res = img_resolution >> level
            if level == lowest_level:
                # EDM2 always puts attention in this first decoder block. We do so only when the
                # lowest resolution is in attn_resolutions (true for the defaults), so that an
                # empty attn_resolutions gives a purely convolutional net, the fastest choice on
                # CPU (about 5% less time per training step for the default 32 px net on 2
                # cores) and what the argument says.
                self.dec[f"{res}x{res}_in0"] = block(channels, channels, flavor="dec",
                                                     attention=res in attention_at)
                self.dec[f"{res}x{res}_in1"] = block(channels, channels, flavor="dec")
            else:
                # The up block already narrows to this level's width, so that the blocks at the
                # higher resolution (where most of the time goes) are no wider than the encoder's
                # there. EDM2 keeps the lower level's width until the next block; at the small
                # widths CPUs can afford, narrowing here took us from 0.82x to about 0.96x of
                # diffusers' images/s at matched parameters (benchmarks/diffusion_throughput.py).
                self.dec[f"{res}x{res}_up"] = block(channels, out_channels, flavor="dec",
                                                    resample_mode="up")
                channels = out_channels
            for index in range(num_blocks + 1):
                in_channels = channels + skip_channels.pop()
                channels = out_channels
                self.dec[f"{res}x{res}_block{index}"] = block(
                    in_channels, channels, flavor="dec", attention=res in attention_at)
        self.out_conv = MPConv(channels, img_channels, (3, 3))

    def forward(self, x: Tensor, noise_labels: Tensor, cond: Tensor | None) -> Tensor:
        self._check_input(x)
        emb = self._embedding(noise_labels, cond, batch=x.shape[0], device=x.device)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, module in self.enc.items():
            x = module(x) if name.endswith("_conv") else module(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def _embedding(self, noise_labels: Tensor, cond: Tensor | None, batch: int,
                   device: torch.device) -> Tensor:
        """Per-sample embedding of the noise level, blended with that of the cond vector."""
        noise_labels = noise_labels.to(device=device, dtype=torch.float32).reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(batch)
        if noise_labels.numel() != batch:
            raise ValueError(f"noise_labels has {noise_labels.numel()} values "
                             f"for a batch of {batch}")
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_cond is None and cond is not None and cond.shape[-1] != 0:
            raise ValueError("this UNet is unconditional (cond_dim=0) but was given a cond; "
                             "pass None")
        if self.emb_cond is not None:
            emb = mp_sum(emb, self.emb_cond(self._cond_or_null(cond, batch, device)),
                         t=self.label_balance)
        return mp_silu(emb)

    def _cond_or_null(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """`cond` as float32 [B, cond_dim]; None is the null (all-zero) condition."""
        if cond is None:
            return torch.zeros(batch, self.cond_dim, device=device)
        cond = cond.to(device=device, dtype=torch.float32)
        if cond.ndim == 1:
            cond = cond.expand(batch, -1)
        if cond.shape != (batch, self.cond_dim):
            raise ValueError(f"cond must be [batch, {self.cond_dim}] = [{batch}, {self.cond_dim}], "
                             f"got {list(cond.shape)}")
        return cond

    def _check_input(self, x: Tensor) -> None:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet expects input [batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got {list(x.shape)}")


def _out_channels(module: nn.Module) -> int:
    return module.out_channels  # type: ignore[return-value]  # MPConv and Block both have it


def _check_shape_arguments(img_resolution: int, img_channels: int, cond_dim: int,
                           model_channels: int, channel_mult: Sequence[int],
                           num_blocks: int) -> None:
    """Refuse, with the reason, shapes that would otherwise fail deep inside a forward."""
    if img_channels < 1 or model_channels < 1 or cond_dim < 0 or num_blocks < 1:
        raise ValueError(f"UNet needs img_channels >= 1, model_channels >= 1, cond_dim >= 0 and "
                         f"num_blocks >= 1 (got {img_channels}, {model_channels}, {cond_dim}, "
                         f"{num_blocks})")
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty list of positive integers, "
                         f"got {list(channel_mult)}")
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution < factor or img_resolution % factor:
        raise ValueError(f"image resolution {img_resolution} is not divisible by {factor}, "
                         f"which {len(channel_mult)} resolution levels "
                         f"(channel_mult={list(channel_mult)}) need; use a resolution that is a "
                         f"multiple of {factor} or fewer levels")
