"""`unpersonal audit`: does the released set single out, re-identify or reveal a training patient?

    run/audit/
        privacy.json   every figure below, each beside its held-out baseline
        dcr.png        distance-to-closest-record histograms, released vs held-out

Judged by the audit's own embedder and re-ID network (`evaluation.sets`), never the filter's.
The held-out population is the test split: real images of patients no model was trained,
validated or calibrated on. What an honest image of a new patient gets is the baseline of every
figure:

* re-identification rate: share of released images the audit's re-ID network links to some
  training patient (its k nearest in re-ID space), vs held-out images. Linked means a score
  above what held-out patients' real images reach against their nearest training image: the
  threshold is the `privacy.reid_heldout_quantile` quantile of the validation images' best
  scores (never below the network's pair threshold), so the test images' rate is near
  1 - that quantile by construction and a release should match it;
* distance to closest record (DCR), in the audit embedder's space and in pixels: quantiles, and
  the share closer than the held-out images' 1st percentile (about 0.01 when private);
* membership inference: ROC-AUC of a distance attack and a density-ratio attack telling training
  from held-out images with the released set in hand (0.5: the set reveals no membership). Its
  non-members are the validation split when it has two patients or more: the attack needs
  non-members drawn the way the members were, and a test split collected apart (Kermany's
  official one) differs in kind, which the density attack measures instead of membership (AUC
  0.63 for a set that scores 0.50 against validation, BENCHMARKS.md). No model generates from
  validation images; they only set thresholds and stop training;
* predicate singling-out: how often "re-ID score with s >= t" isolates exactly one training
  patient, minus the same rate on the held-out population, with a permutation interval;
* planted copies: training images perturbed slightly (`privacy.planted`): the share the audit
  flags (re-ID link, or a DCR below the held-out 1st percentile in either space).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from unpersonal.config import Config
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.evaluation.plots import png_bytes, pyplot
from unpersonal.evaluation.sets import (AUDIT_EMBEDDER, AUDIT_REID, fit_audit_models,
                                        read_synthetic_set)
from unpersonal.privacy.attacks import (ReidScorer, dcr_summary, distance_to_closest_record,
                                        membership_inference, reid_rate, singling_out)
from unpersonal.privacy.floor import AlignedPixels
from unpersonal.privacy.knn import NeighbourIndex
from unpersonal.privacy.planted import plant_copies
from unpersonal.privacy.reid import load_reid
from unpersonal.progress import console
from unpersonal.rundir import RunDir, sha256_json, write_atomic
from unpersonal.training.embedder import load_embedder

STAGE = "audit"
SCHEMA = 1


def stage_key(config: Config, run: RunDir) -> str:
    inputs = {stage: run.require(stage) for stage in
              ("prepare", "generate", AUDIT_EMBEDDER, AUDIT_REID)}
    return sha256_json({"config": config.section_dump(("audit", "privacy")), "inputs": inputs})


def run_audit(config: Config, run: RunDir, force: bool = False) -> bool:
    """Train the audit's models if needed, then audit the released set; False if up to date."""
    fit_audit_models(config, run)
    key = stage_key(config, run)
    if run.up_to_date(STAGE, key, force):
        return False
    dataset = load_canonical(run.stage_path("prepare"))
    released = read_synthetic_set(run.stage_path("generate") / "synthetic", dataset.label_names)
    figures, distances = audit_set(config, run, dataset, released.images)
    with run.build_stage(STAGE, key, config) as folder:
        write_atomic(folder / "privacy.json", json.dumps(figures, indent=2) + "\n")
        write_atomic(folder / "dcr.png", dcr_plot(distances))
    return True


class AuditModels:
    """The audit's embedder and re-ID network with the real images already embedded."""

    def __init__(self, run: RunDir, dataset: CanonicalDataset, quantile: float = 0.98,
                 neighbours: int = 16, pixels: AlignedPixels = AlignedPixels()) -> None:
        self.embedder = load_embedder(run.stage_path(AUDIT_EMBEDDER))
        self.reid = load_reid(run.stage_path(AUDIT_REID))
        features = np.load(run.stage_path(AUDIT_EMBEDDER) / "features.npy")
        is_train, is_test = dataset.split == "train", dataset.split == "test"
        images = dataset.images_float()
        self.train, self.test = dataset.subset("train"), dataset.subset("test")
        self.val = dataset.subset("val")
        self.features = {"train": features[is_train], "test": features[is_test],
                         "val": features[dataset.split == "val"]}
        self.reid_vectors = {"train": self.reid.embed(images[is_train]),
                             "test": self.reid.embed(images[is_test])}
        self.pixels = pixels
        self.pixel_index = NeighbourIndex("cosine").fit(pixels.reference(images[is_train]))
        self.pixel_heldout = pixels.nearest(self.pixel_index, images[is_test])[0]
        pair = ReidScorer.from_model(self.reid)
        self.scorer = ReidScorer(pair.scale, pair.bias, self._any_patient_threshold(
            pair, images[dataset.split == "val"], quantile, neighbours))

    def _any_patient_threshold(self, pair: ReidScorer, val_images: np.ndarray, quantile: float,
                               neighbours: int) -> float:
        """What held-out (validation) patients' images reach against their best training
        match; the pair threshold when there are no validation images."""
        if len(val_images) == 0:
            return pair.threshold
        best = reid_rate(self.reid.embed(val_images), self.reid_vectors["train"], pair,
                         neighbours)["max_score"]
        return max(pair.threshold, float(np.quantile(best, quantile)))


def audit_set(config: Config, run: RunDir, dataset: CanonicalDataset, images: np.ndarray,
              models: AuditModels | None = None
              ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """All privacy figures of one set (images float [N, R, R] in [0, 1]).

    Also used by the benchmarks on sets that are not released (the training set itself, an
    unfiltered sample). Returns the figures and the DCRs for the plot.
    """
    settings = config.audit
    models = models or AuditModels(run, dataset, config.privacy.reid_heldout_quantile,
                                   settings.reid_neighbours,
                                   AlignedPixels.from_settings(config.privacy))
    if len(models.test) < 2:
        raise ValueError("the audit needs held-out (test split) images as its baseline")
    console.print(f"audit: {len(images):,} images against {len(models.train):,} training images "
                  f"of {len(np.unique(models.train.patient_id)):,} patients")
    reid_vectors = models.reid.embed(images)
    features = models.embedder.embed(images)
    k = settings.reid_neighbours
    linked = reid_rate(reid_vectors, models.reid_vectors["train"], models.scorer, k)
    linked_heldout = reid_rate(models.reid_vectors["test"], models.reid_vectors["train"],
                               models.scorer, k)
    distances = {
        "embedding": {
            "synthetic": distance_to_closest_record(features, models.features["train"], "cosine"),
            "heldout": distance_to_closest_record(models.features["test"],
                                                  models.features["train"], "cosine")},
        "pixel": {"synthetic": models.pixels.nearest(models.pixel_index, images)[0],
                  "heldout": models.pixel_heldout}}
    thresholds = sorted({*settings.pso_thresholds, round(models.scorer.threshold, 6)})
    pso = singling_out(reid_vectors, models.reid_vectors["train"], models.train.patient_id,
                       models.reid_vectors["test"], models.test.patient_id, models.scorer,
                       thresholds, repeats=settings.pso_repeats, seed=config.seed)
    nonmember_split = "val" if len(np.unique(models.val.patient_id)) >= 2 else "test"
    nonmembers = models.val if nonmember_split == "val" else models.test
    mia = membership_inference(models.features["train"], models.features[nonmember_split],
                               features, heldout_patient=nonmembers.patient_id, seed=config.seed)
    mia["nonmember_split"] = nonmember_split
    figures = {
        "schema": SCHEMA, "images": len(images), "heldout_images": len(models.test),
        "training_images": len(models.train),
        "models": {"embedder": AUDIT_EMBEDDER, "reid": AUDIT_REID,
                   "reid_threshold": models.scorer.threshold,
                   "reid_pair_threshold": models.reid.threshold,
                   "reid_auc": models.reid.meta.get("auc")},
        "reid_rate": {"synthetic": linked["rate"], "heldout": linked_heldout["rate"],
                      "neighbours": k},
        "dcr": {space: dcr_summary(d["synthetic"], d["heldout"])
                for space, d in distances.items()},
        "membership_inference": _json(mia),
        "singling_out": _json(pso),
        "planted_copies": planted_copy_check(config, models, distances) if settings.planted else None,
    }
    return figures, distances


def planted_copy_check(config: Config, models: AuditModels,
                       distances: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Near-copies of training images mixed in: the share the audit flags, per perturbation.

    Flagged: linked by re-ID, or closer to a training image than the held-out 1st percentile
    in either space. An audit that misses these could not vouch for anything.
    """
    rng = np.random.default_rng([config.seed, 5])
    count = min(config.audit.planted, len(models.train))
    rows = rng.choice(len(models.train), count, replace=False)
    cutoffs = {space: float(np.quantile(d["heldout"], 0.01)) for space, d in distances.items()}
    caught = {}
    for name, copies in plant_copies(models.train.images_float()[rows], seed=config.seed).items():
        linked = reid_rate(models.reid.embed(copies), models.reid_vectors["train"], models.scorer,
                           config.audit.reid_neighbours)["linked"]
        close_embedding = distance_to_closest_record(
            models.embedder.embed(copies), models.features["train"], "cosine") < cutoffs["embedding"]
        close_pixels = models.pixels.nearest(models.pixel_index, copies)[0] < cutoffs["pixel"]
        flagged = linked | close_embedding | close_pixels
        caught[name] = {"caught": float(flagged.mean()), "reid": float(linked.mean()),
                        "embedding_dcr": float(close_embedding.mean()),
                        "pixel_dcr": float(close_pixels.mean())}
    return {"copies_per_perturbation": int(count), "by_perturbation": caught,
            "caught_all": float(np.mean([c["caught"] for c in caught.values()]))}


def _json(value: Any) -> Any:
    """numpy scalars and arrays inside a result -> plain JSON values; per-image arrays dropped."""
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()
                if not (isinstance(item, np.ndarray) and item.ndim == 1 and len(item) > 64)}
    if isinstance(value, (list, tuple)):
        return [_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def dcr_plot(distances: dict[str, dict[str, np.ndarray]]) -> bytes:
    """Histograms of each released image's distance to its closest training image, over the
    same for held-out real images: a private set sits where the held-out one does, not left
    of it."""
    plt = pyplot()

    figure, axes = plt.subplots(1, len(distances), figsize=(5 * len(distances), 3.6))
    for axis, (space, d) in zip(np.atleast_1d(axes), distances.items()):
        high = float(np.quantile(np.concatenate([d["synthetic"], d["heldout"]]), 0.995))
        bins = np.linspace(0, high, 40)
        axis.hist(d["heldout"], bins=bins, density=True, alpha=0.55, label="held-out real")
        axis.hist(d["synthetic"], bins=bins, density=True, alpha=0.55, label="released")
        axis.axvline(np.quantile(d["heldout"], 0.01), color="black", linewidth=1, linestyle="--",
                     label="held-out 1st percentile")
        unit = "cosine distance" if space == "embedding" else "1 - correlation, best shift"
        axis.set(title=f"closest training image ({space})", xlabel=unit, ylabel="density")
        axis.legend(fontsize=8)
    return png_bytes(figure)


def load_privacy(run: RunDir) -> dict[str, Any]:
    run.require(STAGE)
    return json.loads((run.stage_path(STAGE) / "privacy.json").read_text())
