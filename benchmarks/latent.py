"""Latent diffusion at 128 px: the autoencoder, what it costs the denoiser, what it keeps.

    .venv/bin/python benchmarks/latent.py throughput       # denoiser images/s, pixel vs latent
    .venv/bin/python benchmarks/latent.py autoencoders     # MONAI's AutoencoderKL vs our own
    .venv/bin/python benchmarks/latent.py speed            # their training steps side by side
    .venv/bin/python benchmarks/latent.py quality          # the chosen one through the CLI
    .venv/bin/python benchmarks/latent.py ceiling          # what the latents keep for a classifier
    .venv/bin/python benchmarks/latent.py multilabel       # phantoms with four findings, end to end
    .venv/bin/python benchmarks/latent.py release          # the cpu-128 preset on Kermany, end to end

Each part adds its figures to `benchmarks/results/latent.json` under its name.

* throughput: one training step of the cpu preset's denoiser (EDM loss, Adam) on 128 px images,
  on the 32 px latents of a factor-4 autoencoder, on the 16 px latents of a factor-8 one and on
  32 px images (what the cpu preset trains on),
  rounds alternating so machine noise hits all alike; medians. Latents are encoded once before
  training, so the denoiser's step is the whole per-step cost.
* autoencoders: MONAI's AutoencoderKL and ours (`unpersonal.models.autoencoder`), same widths,
  same loss, same steps and seeds, trained by `unpersonal.training.autoencoder.train` on
  Kermany's 128 px training split (`runs/latent-data`); validation PSNR / SSIM and training
  images/s. Settings are chosen on the validation split.
* speed: one training step of each (batch 16, 128 px), rounds alternating; medians.
* quality: `unpersonal fit-autoencoder` on Kermany 128 px at the cpu-128 preset, then PSNR
  and SSIM of the test images' reconstructions (the test split reports, once).
* ceiling: classifiers (the classifier section's settings, `--input-size` px inside the network)
  trained on the autoencoder's reconstructions of the real training images and on the originals,
  same seeds, early-stopped on the real validation images, tested on the real test images: the
  most a latent release could teach, against the real baseline.
* multilabel: `unpersonal run` at the demo preset on phantoms with four kinds of finding
  (`phantoms.findings=4`, `runs/multilabel-demo`): each label's test ROC-AUC for the classifier
  trained on real images and on the release, and the audit's verdicts.
* release: `unpersonal run --preset cpu-128` on Kermany's 128 px file (`runs/bench-kermany-128`,
  resumable), `--seeds` classifier seeds: each stage's time and the whole run's, the
  synthetic-only ROC-AUC and its gap to the real-trained classifier at 64 px, FD and coverage,
  the audit's verdicts; beside the 32 px headline's figures from `results/kermany.json`. Each
  classifier is tested at its own resolution on the same test patients.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner import provenance, side_by_side, unpersonal, write_table
from unpersonal.config import AutoencoderConfig
from unpersonal.data.canonical import load_canonical
from unpersonal.models import UNet
from unpersonal.models.edm import Denoiser, EDM2Loss
from unpersonal.training import autoencoder as trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latent.json"
DATA = ROOT.parent / "shared" / "data" / "kermany_cxr_128.npz"
RUN = ROOT / "runs" / "latent-data"
COND_DIM = 34  # binary label code (2) + 32 pseudo features
DENOISER = dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=())


def save(part: str, figures: dict[str, Any]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[part] = {**provenance(), "threads": torch.get_num_threads(), **figures}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results[part], indent=2), flush=True)


# ---------------------------------------------------------------------------------------------
# throughput


def throughput(batch: int, rounds: int, steps: int) -> dict[str, Any]:
    shapes = {"pixel 128 px": (1, 128), "latent f=4 (4x32x32)": (4, 32),
              "latent f=8 (4x16x16)": (4, 16), "pixel 32 px": (1, 32)}
    torch.manual_seed(0)
    nets = {name: Denoiser(UNet(size, channels, COND_DIM, **DENOISER), sigma_data=0.5)
            .to(memory_format=torch.channels_last) for name, (channels, size) in shapes.items()}
    data = {name: torch.randn(batch, channels, size, size).contiguous(
        memory_format=torch.channels_last) * 0.5 for name, (channels, size) in shapes.items()}
    cond = torch.randn(batch, COND_DIM)
    loss_fn = EDM2Loss(-0.4, 1.0, 0.5)
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-3) for name, net in nets.items()}
    generator = torch.Generator().manual_seed(0)

    def step(name: str) -> None:
        loss = loss_fn(nets[name], data[name], cond, generator=generator).mean()
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    medians, rates = side_by_side(list(nets), step, rounds, steps, batch)
    pixel = medians["pixel 128 px"]
    return {"batch": batch,
            "rounds": rounds, "denoiser": DENOISER,
            "img_per_s": medians, "img_per_s_all_rounds": rates,
            "speedup_over_pixel": {name: round(rate / pixel, 2) for name, rate in medians.items()}}


# ---------------------------------------------------------------------------------------------
# autoencoders


def monai_autoencoder(width: int, factor: int, latent_channels: int, res_blocks: int
                      ) -> nn.Module:
    """MONAI's AutoencoderKL at the widths of ours, without attention."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.networks.nets import AutoencoderKL

    levels = int(math.log2(factor))
    return AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1,
        channels=tuple(width * 2 ** level for level in range(levels + 1)),
        num_res_blocks=res_blocks, attention_levels=(False,) * (levels + 1),
        latent_channels=latent_channels, norm_num_groups=math.gcd(width, 8),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def prepared() -> Path:
    """The Kermany 128 px run whose prepare stage the autoencoders train on."""
    if not DATA.is_file():
        raise SystemExit(f"needs {DATA}")
    unpersonal("prepare", "--out", str(RUN), "--data", str(DATA), "--preset", "cpu-128")
    return RUN


def autoencoders(steps: int) -> dict[str, Any]:
    dataset = load_canonical(prepared() / "prepare")
    settings = AutoencoderConfig(steps=steps)
    device = torch.device("cpu")
    builders = {"monai": monai_autoencoder, "ours": trainer.build_autoencoder}
    figures: dict[str, Any] = {"settings": settings.model_dump()}
    for name, build in builders.items():
        trainer.build_autoencoder = build
        started = time.perf_counter()
        result = trainer.train(settings, 0, dataset.subset("train"), None, device, name)
        seconds = time.perf_counter() - started
        figures[name] = {
            "parameters": sum(p.numel() for p in result.network.parameters()),
            "seconds": round(seconds, 1),
            "train_img_per_s": round(steps * settings.batch_size / seconds, 2),
            "val": trainer.reconstruction_quality(result.network, dataset.subset("val"), device)}
        print(name, figures[name], flush=True)
    return figures


def speed(rounds: int, steps: int, batch: int = 16) -> dict[str, Any]:
    """Training steps per second of MONAI's and our autoencoder side by side, alternating."""
    settings = AutoencoderConfig()
    shape = (settings.width, settings.factor, settings.latent_channels, settings.res_blocks)
    torch.manual_seed(0)
    nets = {"monai": monai_autoencoder(*shape), "ours": trainer.build_autoencoder(*shape)}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-4) for name, net in nets.items()}
    images = torch.rand(batch, 1, 128, 128) * 2 - 1
    structure = trainer.ssim_loss(2.0)

    def step(name: str) -> None:
        mu, sigma = nets[name].encode(images)
        reconstruction = nets[name].decode(mu + sigma * torch.randn_like(mu))
        loss = ((reconstruction - images).abs().mean()
                + settings.ssim_weight * structure(reconstruction, images).mean()
                + settings.kl_weight * trainer.kl_divergence(mu, sigma))
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    medians, _ = side_by_side(list(nets), step, rounds, steps, batch)
    return {"batch": batch, "rounds": rounds, "train_img_per_s": medians,
            "parameters": {name: sum(p.numel() for p in net.parameters())
                           for name, net in nets.items()},
            "ratio_ours_over_monai": round(medians["ours"] / medians["monai"], 2)}


def quality() -> dict[str, Any]:
    run = prepared()
    seconds = unpersonal("fit-autoencoder", "--out", str(run), "--preset", "cpu-128")
    meta = json.loads((run / "fit-autoencoder" / "autoencoder.json").read_text())
    dataset = load_canonical(run / "prepare")
    from unpersonal.artifacts.autoencoder import load_codec

    codec = load_codec(run / "fit-autoencoder", 0.5)
    test = trainer.reconstruction_quality(codec.network, dataset.subset("test"),
                                          torch.device("cpu"))
    return {"settings": meta["architecture"],
            "steps": meta["steps_done"], "training_seconds": meta["seconds"],
            "stage_seconds": seconds, "val": meta["reconstruction"]["val"], "test": test}


def ceiling(seeds: int, input_size: int) -> dict[str, Any]:
    from unpersonal.artifacts.autoencoder import load_codec
    from unpersonal.config import ClassifierConfig
    from unpersonal.metrics.auc import roc_auc_per_class
    from unpersonal.training.classifier import fit_classifier

    run = RUN
    dataset = load_canonical(run / "prepare")
    codec = load_codec(run / "fit-autoencoder", 0.5)
    train, val, test = (dataset.subset(split) for split in ("train", "val", "test"))
    with torch.no_grad():
        reconstructed = torch.cat([
            codec.decode(codec.encode(trainer.to_model_range(train, slice(start, start + 64))))
            for start in range(0, len(train), 64)])
    sets = {"original": train.images_float(),
            "reconstructed": ((reconstructed[:, 0] + 1) / 2).numpy()}
    settings = ClassifierConfig(input_size=input_size)
    aucs: dict[str, list[float]] = {name: [] for name in sets}
    for seed in range(seeds):
        for name, images in sets.items():
            model = fit_classifier(images, train.labels, train.label_kind, settings, seed,
                                   val.images_float(), val.labels, progress=None,
                                   label_names=train.label_names)
            probs = model.predict_proba(test.images_float())
            aucs[name].append(roc_auc_per_class(test.labels, probs, test.label_kind,
                                                test.label_names)["mean"])
            print(name, seed, aucs[name][-1], flush=True)
    gaps = [100 * (r - o) for r, o in zip(aucs["reconstructed"], aucs["original"])]
    return {"classifier": settings.model_dump(), "seeds": seeds,
            "test_auc": {name: {"mean": round(statistics.mean(v), 4),
                                "per_seed": [round(x, 4) for x in v]} for name, v in aucs.items()},
            "gap_pp_per_seed": [round(g, 2) for g in gaps],
            "gap_pp_mean": round(statistics.mean(gaps), 2),
            "target": "reconstructed within 0.5 points of original",
            "target_met": statistics.mean(gaps) >= -0.5}


def multilabel(seeds: int) -> dict[str, Any]:
    run = ROOT / "runs" / "multilabel-demo"
    seconds = unpersonal("run", "--out", str(run), "--preset", "demo",
                         "--set", "phantoms.findings=4",
                         "--set", f"evaluate.classifier_seeds={seeds}")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    privacy = json.loads((run / "audit" / "privacy.json").read_text())
    classification = metrics["utility"]["classification"]
    return {"run_seconds": seconds, "classifier_seeds": seeds,
            "per_label_auc": {name: {"real": classification["real"]["per_class"][name],
                                     "synthetic": classification["synthetic"]["per_class"][name]}
                              for name in classification["real"]["per_class"]},
            "mean_auc": {which: classification[which]["mean"] for which in ("real", "synthetic")},
            "audit_failed_tests": [name for name, test in privacy["tests"]["by_figure"].items()
                                   if test["rejected"]]}


RELEASE_RUN = ROOT / "runs" / "bench-kermany-128"
# The order one uninterrupted `unpersonal run --preset cpu-128` builds the stages in.
LATENT_STAGE_ORDER = ("prepare", "fit-embedder", "fit-reid", "calibrate", "fit-classifier",
                      "fit-autoencoder", "fit-diffusion", "generate", "audit-embedder",
                      "audit-reid", "audit", "eval")


def release(seeds: int) -> dict[str, Any]:
    from kermany import stage_seconds

    if not DATA.is_file():
        raise SystemExit(f"needs {DATA}")
    invocation = unpersonal("run", "--out", str(RELEASE_RUN), "--data", str(DATA), "--preset",
                            "cpu-128", "--set", f"evaluate.classifier_seeds={seeds}")
    metrics = json.loads((RELEASE_RUN / "eval" / "metrics.json").read_text())
    privacy = json.loads((RELEASE_RUN / "audit" / "privacy.json").read_text())
    classes = metrics["utility"]["classification"]
    fidelity = metrics["fidelity"]
    seconds = stage_seconds(RELEASE_RUN, LATENT_STAGE_ORDER)
    headline = json.loads((RESULTS.parent / "kermany.json").read_text())
    return {
        "run": RELEASE_RUN.name, "classifier_seeds": seeds, "invocation_s": invocation,
        "stage_seconds": seconds, "wall_time_s": round(sum(seconds.values()), 1),
        "auc_real": classes["real"]["mean"], "auc_synthetic": classes["synthetic"]["mean"],
        "gap_pp": classes["gap_pp"], "gap_pp_ci": classes["gap_pp_ci95"],
        "fd": fidelity["fd"], "coverage": fidelity["prdc"]["coverage"],
        "recall": fidelity["prdc"]["recall"],
        "audit_passed": privacy["tests"]["passed"],
        "audit_failed_tests": [name for name, test in privacy["tests"]["by_figure"].items()
                               if test["rejected"]],
        "headline_32px": {key: headline.get(key) for key in (
            "auc_real", "auc_synthetic", "gap_pp", "gap_pp_ci", "fd", "coverage", "recall",
            "wall_time_s", "date", "classifier_seeds", "audit_flagged_ours")}}


def release_table(figures: dict[str, Any]) -> str:
    """BENCHMARKS.md's table: the 128 px latent release beside the 32 px pixel headline."""
    headline = figures["headline_32px"]
    audit = "passes" if figures["audit_passed"] else (
        "fails " + ", ".join(figures["audit_failed_tests"]))

    def row(name: str, f: dict[str, Any], seeds: Any, audited: str) -> str:
        low, high = f["gap_pp_ci"]
        return (f"| {name} | {seeds} | {f['auc_real']:.3f} | {f['auc_synthetic']:.3f} | "
                f"{f['gap_pp']:+.2f} ({low:+.2f} to {high:+.2f}) | {f['fd']:.4f} | "
                f"{f['coverage']:.3f} | {f['recall']:.3f} | {audited} | "
                f"{f['wall_time_s'] / 3600:.1f} h |")

    return "\n".join([
        "| release | classifier seeds | real ROC-AUC | synthetic ROC-AUC | gap (pp, 95% CI) "
        "| FD | coverage | recall | audit | whole run |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---:|",
        row("cpu-128: latent, 128 px (classifier 64 px)", figures,
            figures["classifier_seeds"], audit),
        row(f"cpu: pixels, 32 px (headline of {headline['date']})", headline,
            headline["classifier_seeds"],
            f"flagged {100 * headline['audit_flagged_ours']:.1f}% (the audit of its day)")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("throughput", "autoencoders", "speed", "quality",
                                         "ceiling", "multilabel", "release"))
    parser.add_argument("--steps", type=int, default=1000, help="autoencoders: training steps")
    parser.add_argument("--batch", type=int, default=32, help="throughput: images per step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3,
                        help="ceiling, multilabel, release: classifier seeds")
    parser.add_argument("--input-size", type=int, default=64,
                        help="ceiling: the classifier's input side")
    options = parser.parse_args()
    if options.part == "throughput":
        save("throughput", throughput(options.batch, options.rounds, steps=2))
    elif options.part == "autoencoders":
        save("autoencoders", autoencoders(options.steps))
    elif options.part == "speed":
        save("speed", speed(options.rounds, steps=2))
    elif options.part == "quality":
        save("quality", quality())
    elif options.part == "ceiling":
        save("ceiling", ceiling(options.seeds, options.input_size))
    elif options.part == "multilabel":
        save("multilabel", multilabel(options.seeds))
    else:
        figures = release(options.seeds)
        save("release", figures)
        write_table(ROOT / "BENCHMARKS.md", "latent.py", release_table(figures))


if __name__ == "__main__":
    main()
