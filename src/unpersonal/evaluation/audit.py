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

from pathlib import Path
from typing import Any

import numpy as np

from unpersonal.artifacts.embedder import load_embedder
from unpersonal.artifacts.reid import ReidScorer, load_reid
from unpersonal.config import AuditConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.evaluation.plots import png_bytes, pyplot
from unpersonal.evaluation.sets import AUDIT_EMBEDDER, AUDIT_REID
from unpersonal.privacy.attacks import (dcr_summary, distance_to_closest_record,
                                        membership_inference, reid_rate, singling_out)
from unpersonal.privacy.floor import AlignedPixels
from unpersonal.privacy.knn import NeighbourIndex
from unpersonal.privacy.planted import plant_copies
from unpersonal.progress import console

SCHEMA = 1


class AuditModels:
    """The audit's embedder and re-ID network with the real images already embedded."""

    def __init__(self, embedder: Path, reid: Path, dataset: CanonicalDataset,
                 quantile: float = 0.98, neighbours: int = 16,
                 pixels: AlignedPixels = AlignedPixels()) -> None:
        """`embedder` and `reid`: the folders of the audit's own models (audit-embedder and
        audit-reid); `quantile` of validation images' best re-ID scores sets the any-patient
        threshold, over their `neighbours` nearest training images."""
        self.embedder = load_embedder(embedder)
        self.reid = load_reid(reid)
        features = np.load(embedder / "features.npy")
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
        pair = self.reid.scorer
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


def audit_set(models: AuditModels, images: np.ndarray, settings: AuditConfig, seed: int
              ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """All privacy figures of one set (images float [N, R, R] in [0, 1]).

    Also used by the benchmarks on sets that are not released (the training set itself, an
    unfiltered sample). Returns the figures and the DCRs for the plot.
    """
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
                       thresholds, repeats=settings.pso_repeats, seed=seed)
    nonmember_split = "val" if len(np.unique(models.val.patient_id)) >= 2 else "test"
    nonmembers = models.val if nonmember_split == "val" else models.test
    mia = membership_inference(models.features["train"], models.features[nonmember_split],
                               features, heldout_patient=nonmembers.patient_id, seed=seed)
    mia["nonmember_split"] = nonmember_split
    figures = {
        "schema": SCHEMA, "images": len(images), "heldout_images": len(models.test),
        "training_images": len(models.train),
        "models": {"embedder": AUDIT_EMBEDDER, "reid": AUDIT_REID,
                   "reid_threshold": models.scorer.threshold,
                   "reid_pair_threshold": models.reid.scorer.threshold,
                   "reid_auc": models.reid.meta.get("auc")},
        "reid_rate": {"synthetic": linked["rate"], "heldout": linked_heldout["rate"],
                      "neighbours": k},
        "dcr": {space: dcr_summary(d["synthetic"], d["heldout"])
                for space, d in distances.items()},
        "membership_inference": _json(mia),
        "singling_out": _json(pso),
        "planted_copies": (planted_copy_check(models, distances, settings, seed)
                           if settings.planted else None),
    }
    return figures, distances


def planted_copy_check(models: AuditModels, distances: dict[str, dict[str, np.ndarray]],
                       settings: AuditConfig, seed: int) -> dict[str, Any]:
    """Near-copies of training images mixed in: the share the audit flags, per perturbation.

    Flagged: linked by re-ID, or closer to a training image than the held-out 1st percentile
    in either space. An audit that misses these could not vouch for anything.
    """
    rng = np.random.default_rng([seed, 5])
    count = min(settings.planted, len(models.train))
    rows = rng.choice(len(models.train), count, replace=False)
    cutoffs = {space: float(np.quantile(d["heldout"], 0.01)) for space, d in distances.items()}
    caught = {}
    for name, copies in plant_copies(models.train.images_float()[rows], seed=seed).items():
        linked = reid_rate(models.reid.embed(copies), models.reid_vectors["train"], models.scorer,
                           settings.reid_neighbours)["linked"]
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
