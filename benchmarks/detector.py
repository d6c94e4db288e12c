"""How well re-ID networks know patients and copies: held-out verification, and the precision
at recall 0.95 with which they tell leaked training images from held-out ones.

    .venv/bin/python benchmarks/detector.py [--variants NAME ...] [--model-run RUN]

Each variant below is a run `runs/bench-detector-NAME` made through the CLI (`prepare` of
Kermany at its resolution with the cpu preset, then `fit-reid` with its settings; an existing
run is reused when up to date), and `headline` is the headline run's own network
(`runs/bench-kermany-32`, benchmarks/kermany.py). On the patients of the validation and test
splits, none of whom any network trained on:

* verification: ROC-AUC of same- against different-patient pairs (`fit-reid`'s held-out pairs),
  the share of different-patient pairs flagged at the threshold that flags 99% of validation
  same-patient pairs (calibrated on validation, measured on test), and the share of test
  same-patient pairs flagged at 1% false positives;
* leaks: for each leak kind of the leak suite (`privacy.leaks`), `--leaks` leaked images of the
  training set against every held-out real image, each scored by its highest re-ID cosine with
  any training image (what the filter's check against all patients ranks). The threshold is
  set so that 95% of the leaks are flagged; precision is for as many leaks as held-out images,
  recall / (recall + false-positive rate). The model's near-copies come from `--model-run`'s
  diffusion model (a trained run on the same data; resized to the detector's resolution).

Writes benchmarks/results/detector.json (or `--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from runner import provenance, sets, unpersonal, write_table
from unpersonal.artifacts.reid import ReidModel, load_reid
from unpersonal.config import Config, load_config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.data.pixels import resize
from unpersonal.privacy.leaks import IDENTITY_PROBE, MODEL_PREFIX, leak_kinds, make_leaks
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.sampling.sampler import load_sampler
from unpersonal.torch_utils import pick_device
from unpersonal.training.reid import calibrate_cosine, held_out_pairs, pair_cosines

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "detector.json"
RECALL = 0.95
FPR_POINT = 0.01
KERMANY = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
HEADLINE = ROOT / "runs" / "bench-kermany-32"
SHORT = ("reid.steps=1500", "reid.validate_every=250", "reid.patience=20")
# name: (resolution of the prepared images, fit-reid settings beyond the cpu preset's)
VARIANTS = {
    "instance-32": (32, ("reid.instance_share=0.5", *SHORT)),
    "instance-64": (64, ("reid.input_size=64", "reid.stem_stride=2", "reid.instance_share=0.5",
                         *SHORT)),
    "strided-64": (64, ("reid.input_size=64", "reid.stem_stride=2")),
    # Almost every pair an instance pair: as near a pure copy detector as the loss allows.
    "copies-32": (32, ("reid.instance_share=0.99", *SHORT)),
}


def verification(model: ReidModel, config: Config, dataset: CanonicalDataset) -> dict[str, Any]:
    """AUC per split, test FPR at the validation-calibrated 99% threshold, TPR at 1% FPR."""
    seed = config.seed
    cosines, same = {}, {}
    for split in ("val", "test"):
        pairs = held_out_pairs(dataset.subset(split), config.data.no_patient_ids, seed, split)
        cosines[split] = pair_cosines(model.net, pairs, config.reid.augment, seed, model.device)
        same[split] = pairs.same
    threshold = calibrate_cosine(cosines["val"][same["val"]], config.reid.sensitivity)
    fpr, tpr, _ = roc_curve(same["test"], cosines["test"])
    return {
        "auc": {split: float(roc_auc_score(same[split], cosines[split])) for split in cosines},
        "sensitivity": config.reid.sensitivity,
        "flagged_at_threshold": {
            split: {"same_patient": float(np.mean(cosines[split][same[split]] >= threshold)),
                    "different_patient": float(np.mean(cosines[split][~same[split]] >= threshold))}
            for split in cosines},
        "tpr_at_1pct_fpr_test": float(np.interp(FPR_POINT, fpr, tpr)),
        "pairs_test": {"same_patient": int(same["test"].sum()),
                       "different_patient": int((~same["test"]).sum())},
        "seconds_training": model.meta.get("seconds"), "steps_done": model.meta.get("steps_done"),
        "architecture": model.meta["architecture"]}


@functools.cache
def model_near_copies(model_run: Path, resolution: int
                      ) -> Callable[[np.ndarray, np.ndarray, float, list[int]], np.ndarray]:
    """`renoise` for the leak kit from another run's diffusion model on the same data: each
    training row noised and denoised at that run's resolution, resized to `resolution`."""
    config = load_config(config_file=model_run / "config.yaml")
    train = load_canonical(RunDir(model_run).stage_path("prepare")).subset("train")
    sampler = load_sampler(RunDir(model_run).stage_path("fit-diffusion"), train,
                           config.sampling, 1.0, pick_device())
    images = train.images_float()

    def renoise(rows: np.ndarray, _: np.ndarray, sigma: float, seeds: list[int]) -> np.ndarray:
        return np.stack([resize(image, resolution)
                         for image in sampler.renoise(rows, images[rows], sigma, seeds)])

    return renoise


def leak_detection(model: ReidModel, dataset: CanonicalDataset, seed: int, count: int,
                   model_run: Path | None) -> dict[str, Any]:
    """Precision at recall 0.95 per leak kind against the held-out real images."""
    train = dataset.subset("train")
    train_images = train.images_float()
    train_embedding = model.embed(train_images)
    heldout = np.concatenate([dataset.subset(split).images_float() for split in ("val", "test")])
    negative = (model.embed(heldout) @ train_embedding.T).max(axis=1)
    renoise = None if model_run is None else model_near_copies(model_run, dataset.resolution)
    probes = dataset.subset("probe").images_float()
    kinds = {}
    for kind in leak_kinds():
        if kind.startswith(MODEL_PREFIX) and renoise is None:
            continue
        if kind == IDENTITY_PROBE and len(probes) == 0:
            continue
        leaks = make_leaks(kind, train_images, train.patient_id,
                           min(count, len(probes)) if kind == IDENTITY_PROBE else count, seed,
                           renoise=renoise, probes=probes)
        positive = (model.embed(leaks.images) @ train_embedding.T).max(axis=1)
        threshold = np.quantile(positive, 1 - RECALL, method="lower")
        recall = float(np.mean(positive >= threshold))
        false_positive = float(np.mean(negative >= threshold))
        kinds[kind] = {"leaks": len(positive), "recall": recall,
                       "false_positive_rate": false_positive,
                       "precision_balanced": recall / (recall + false_positive),
                       "auc": float(roc_auc_score(np.r_[np.ones(len(positive)),
                                                        np.zeros(len(negative))],
                                                  np.r_[positive, negative]))}
        print(f"  {kind}: precision {kinds[kind]['precision_balanced']:.3f} at recall "
              f"{recall:.3f}, AUC {kinds[kind]['auc']:.3f}", flush=True)
    return {"heldout_images": len(negative), "kinds": kinds}


def variant_run(name: str) -> Path:
    """The variant's run, prepared and trained through the CLI (up to date: nothing redone)."""
    resolution, overrides = VARIANTS[name]
    folder = ROOT / "runs" / f"bench-detector-{name}"
    common = ("--out", str(folder), "--data", str(KERMANY), "--preset", "cpu",
              *sets(f"data.resolution={resolution}"))
    unpersonal("prepare", *common)
    unpersonal("fit-reid", *common, *sets(*overrides))
    return folder


TABLE_KINDS = ("shift", "planted", "flip", "crop", "rotate", "model-0.2", "model-0.5",
               "identity-probe")


def table(result: dict[str, Any]) -> str:
    """Verification and leak-detection figures, one row per network."""
    lines = ["| network | input px | steps | training s | AUC val / test | different-patient "
             "pairs flagged at 99% (test) | TPR at 1% FPR (test) | "
             + " | ".join(TABLE_KINDS) + " |",
             "|---|---:|---:|---:|---|---:|---:|" + "---:|" * len(TABLE_KINDS)]
    for name, r in result["runs"].items():
        arch, kinds = r["architecture"], r["leaks"]["kinds"]
        size = min(arch["input_size"], arch["resolution"])
        lines.append(
            f"| {name} | {size} | {r['steps_done']} | {r['seconds_training']:.0f} | "
            f"{r['auc']['val']:.3f} / {r['auc']['test']:.3f} | "
            f"{r['flagged_at_threshold']['test']['different_patient']:.1%} | "
            f"{r['tpr_at_1pct_fpr_test']:.1%} | "
            + " | ".join(f"{kinds[kind]['precision_balanced']:.2f}" if kind in kinds else "-"
                         for kind in TABLE_KINDS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["headline", *VARIANTS],
                        help="which networks (default: the headline run's and every variant)")
    parser.add_argument("--model-run", type=Path, default=HEADLINE,
                        help="a trained run on the same data whose diffusion model makes the "
                             "model-<sigma> leaks")
    parser.add_argument("--leaks", type=int, default=500, help="leaked images per kind")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result: dict[str, Any] = {**provenance(), "runs": {}}
    for name in args.variants:
        folder = HEADLINE if name == "headline" else variant_run(name)
        started = time.perf_counter()
        run = RunDir(folder)
        config = load_config(config_file=folder / "config.yaml")
        dataset = load_canonical(run.stage_path("prepare"))
        print(f"{folder.name}:", flush=True)
        model = load_reid(run.stage_path("fit-reid"))
        figures = verification(model, config, dataset)
        print(f"  AUC val {figures['auc']['val']:.3f} test {figures['auc']['test']:.3f}; "
              f"different-patient pairs flagged at 99%: "
              f"{figures['flagged_at_threshold']['test']['different_patient']:.3f}; "
              f"TPR at 1% FPR {figures['tpr_at_1pct_fpr_test']:.3f}", flush=True)
        figures["leaks"] = leak_detection(model, dataset, config.seed, args.leaks,
                                          args.model_run)
        figures["reid_settings"] = config.reid.model_dump(mode="json")
        figures["seconds"] = round(time.perf_counter() - started, 1)
        result["runs"][name] = figures
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    if args.out == DEFAULT_OUT:  # a run written elsewhere leaves BENCHMARKS.md alone
        write_table(ROOT / "BENCHMARKS.md", "detector.py", table(result))


if __name__ == "__main__":
    main()
