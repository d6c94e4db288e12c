"""Training throughput of our EDM2-style UNet against diffusers' UNet2DModel, side by side.

    .venv/bin/python benchmarks/diffusion_throughput.py      # -> benchmarks/results/diffusion_throughput.json

Both networks run the same training step (EDM preconditioning, EDM loss weighting, Adam) on
the same batch, at the same resolution, with parameter counts matched within 10%. Rounds
alternate between the two models so machine noise hits both alike; medians are reported.
FLOPs per step are counted with torch's FlopCounterMode; the CPU's peak is measured as the best
float32 matrix-multiply rate on the same threads, so "share of peak" is against what this
machine can actually do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from runner import peak_flops
from unpersonal.models import UNet, count_parameters

ROOT = Path(__file__).resolve().parents[1]
COND_DIM = 34  # binary label code (2) + 32 pseudo features, as the cpu preset trains
SIGMA_DATA = 0.5

# (resolution, our UNet kwargs, diffusers block_out_channels, layers_per_block), sized so the
# parameter counts agree within 10%.
CASES = [
    (32, dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=()),
     (32, 64, 64), 1),
    (64, dict(model_channels=32, channel_mult=(1, 2, 2, 2), num_blocks=1, attn_resolutions=()),
     (32, 64, 64, 64), 1),
]


class DiffusersNet(torch.nn.Module):
    """UNet2DModel behind our network interface: F(x, c_noise, cond)."""

    def __init__(self, resolution: int, channels: tuple[int, ...], layers: int) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=resolution, in_channels=1, out_channels=1,
            block_out_channels=channels, layers_per_block=layers,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            class_embed_type="identity", add_attention=False,  # no attention in ours either
            norm_num_groups=min(32, channels[0]))
        # UNet2DModel takes a vector condition only at its embedding width: project to it.
        self.cond_projection = torch.nn.Linear(COND_DIM, channels[0] * 4)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, noise_labels, class_labels=self.cond_projection(cond)).sample


def edm_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             cond: torch.Tensor, generator: torch.Generator) -> None:
    """One EDM training step around a bare network (preconditioning written out, as in EDM)."""
    sigma = (torch.randn(len(images), 1, 1, 1, generator=generator) * 1.2 - 1.2).exp()
    noisy = images + torch.randn(images.shape, generator=generator) * sigma
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (SIGMA_DATA**2 + sigma**2).sqrt()
    denoised = c_skip * noisy + c_out * net(c_in * noisy, sigma.flatten().log() / 4, cond)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    loss = (weight * (denoised - images) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_flops(net: torch.nn.Module, images: torch.Tensor, cond: torch.Tensor) -> int:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    with FlopCounterMode(display=False) as counter:
        edm_step(net, optimizer, images, cond, torch.Generator().manual_seed(0))
    return counter.get_total_flops()


def measure(resolution: int, ours_kwargs: dict, channels: tuple[int, ...], layers: int,
            batch: int, rounds: int, steps_per_round: int) -> dict:
    torch.manual_seed(0)
    nets = {"ours": UNet(resolution, 1, COND_DIM, **ours_kwargs),
            "diffusers": DiffusersNet(resolution, channels, layers)}
    images = torch.randn(batch, 1, resolution, resolution).clamp(-1, 1)
    images = images.contiguous(memory_format=torch.channels_last)  # the faster layout, for both
    for net in nets.values():
        net.to(memory_format=torch.channels_last)
    cond = torch.randn(batch, COND_DIM)
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-4) for name, net in nets.items()}
    generator = torch.Generator().manual_seed(0)
    for name, net in nets.items():  # warm-up: allocator, kernels
        net.train()
        for _ in range(2):
            edm_step(net, optimizers[name], images, cond, generator)
    rates: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                edm_step(net, optimizers[name], images, cond, generator)
            rates[name].append(steps_per_round * batch / (time.perf_counter() - start))
    result = {"resolution": resolution, "batch": batch}
    for name, net in nets.items():
        result[name] = {"params": count_parameters(net),
                        "img_per_s": round(statistics.median(rates[name]), 2),
                        "img_per_s_all_rounds": [round(r, 2) for r in rates[name]],
                        "gflop_per_img": round(step_flops(net, images, cond) / batch / 1e9, 3)}
    result["ratio_ours_over_diffusers"] = round(
        result["ours"]["img_per_s"] / result["diffusers"]["img_per_s"], 3)
    result["param_ratio"] = round(result["ours"]["params"] / result["diffusers"]["params"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "diffusion_throughput.json")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    peak = peak_flops()
    cases = []
    for resolution, ours_kwargs, channels, layers in CASES:
        case = measure(resolution, ours_kwargs, channels, layers, options.batch, options.rounds,
                       options.steps_per_round)
        for name in ("ours", "diffusers"):
            achieved = case[name]["img_per_s"] * case[name]["gflop_per_img"] * 1e9
            case[name]["share_of_peak"] = round(achieved / peak, 3)
        cases.append(case)
        print(json.dumps(case), flush=True)
    result = {"command": "python benchmarks/diffusion_throughput.py", "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {options.threads} threads, torch {torch.__version__}",
              "measured_peak_gflops": round(peak / 1e9, 1), "cases": cases}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    _merge_into_diffusion_summary(cases[0])


def _merge_into_diffusion_summary(case: dict) -> None:
    """Keep benchmarks/results/diffusion.json (the issue's summary) in step with these figures."""
    summary = ROOT / "benchmarks" / "results" / "diffusion.json"
    if summary.is_file():
        merged = json.loads(summary.read_text())
        merged.update({"train_img_per_s_ours": case["ours"]["img_per_s"],
                       "train_img_per_s_diffusers": case["diffusers"]["img_per_s"],
                       "params_ours": case["ours"]["params"],
                       "params_diffusers": case["diffusers"]["params"],
                       "throughput_resolution": case["resolution"]})
        summary.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
