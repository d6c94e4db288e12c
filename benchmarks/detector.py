"""How well a run's re-ID network knows patients and copies: held-out verification, and the
precision at recall 0.95 with which it tells leaked training images from held-out ones.

    .venv/bin/python benchmarks/detector.py --runs runs/det-a runs/det-b [--model-run RUN]

For each run (any run with `prepare` and `fit-reid` done; prepare at the detector's resolution),
on the patients of the validation and test splits, none of whom it trained on:

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
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from runner import provenance
from unpersonal.artifacts.reid import load_reid
from unpersonal.config import load_config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.data.pixels import resize
from unpersonal.privacy.leaks import IDENTITY_PROBE, MODEL_PREFIX, leak_kinds, make_leaks
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.sampling.sampler import load_sampler
from unpersonal.torch_utils import pick_device
from unpersonal.training.reid import held_out_pairs, pair_cosines

ROOT = Path(__file__).resolve().parents[1]
RECALL = 0.95
FPR_POINT = 0.01


def verification(run: RunDir, dataset: CanonicalDataset, seed: int) -> dict[str, Any]:
    """AUC per split, test FPR at the validation-calibrated 99% threshold, TPR at 1% FPR."""
    config = load_config(config_file=run.root / "config.yaml")
    model = load_reid(run.stage_path("fit-reid"))
    cosines, same = {}, {}
    for split in ("val", "test"):
        pairs = held_out_pairs(dataset.subset(split), config.data.no_patient_ids, seed, split)
        cosines[split] = pair_cosines(model.net, pairs, config.reid.augment, seed, model.device)
        same[split] = pairs.same
    threshold = float(np.sort(cosines["val"][same["val"]])[
        int(np.floor((1 - config.reid.sensitivity) * same["val"].sum() + 1e-9))])
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


def leak_detection(run: RunDir, dataset: CanonicalDataset, seed: int, count: int,
                   model_run: Path | None) -> dict[str, Any]:
    """Precision at recall 0.95 per leak kind against the held-out real images."""
    model = load_reid(run.stage_path("fit-reid"))
    train = dataset.subset("train")
    train_embedding = model.embed(train.images_float())
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
        leaks = make_leaks(kind, train.images_float(), train.patient_id,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--model-run", type=Path, default=None,
                        help="a trained run on the same data whose diffusion model makes the "
                             "model-<sigma> leaks")
    parser.add_argument("--leaks", type=int, default=500, help="leaked images per kind")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                        / "detector.json")
    args = parser.parse_args()
    result: dict[str, Any] = {**provenance(), "runs": {}}
    for folder in args.runs:
        started = time.perf_counter()
        run = RunDir(folder)
        config = load_config(config_file=folder / "config.yaml")
        dataset = load_canonical(run.stage_path("prepare"))
        print(f"{folder.name}:", flush=True)
        figures = verification(run, dataset, config.seed)
        print(f"  AUC val {figures['auc']['val']:.3f} test {figures['auc']['test']:.3f}; "
              f"different-patient pairs flagged at 99%: "
              f"{figures['flagged_at_threshold']['test']['different_patient']:.3f}; "
              f"TPR at 1% FPR {figures['tpr_at_1pct_fpr_test']:.3f}", flush=True)
        figures["leaks"] = leak_detection(run, dataset, config.seed, args.leaks, args.model_run)
        figures["reid_settings"] = config.reid.model_dump(mode="json")
        figures["seconds"] = round(time.perf_counter() - started, 1)
        result["runs"][folder.name] = figures
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
