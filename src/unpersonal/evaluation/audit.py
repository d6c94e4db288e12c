"""`unpersonal audit`: does the released set single out, re-identify or reveal a training patient?

    run/audit/
        privacy.json   every figure below, each beside its held-out baseline, and the verdicts
        dcr.png        distance-to-closest-record histograms, released vs held-out

Judged by the audit's own embedder and re-ID network (`evaluation.sets`), never the filter's.
The held-out population is the validation split (the test split when validation has fewer than
two patients): real images of patients no model was trained on, drawn the way the training
patients were, so that an honest image and a held-out one are alike, which every test assumes
(a test split collected apart, as Kermany's, is farther from the training images than a new
image of the same population: it would pass leaks by distance and fail honest sets by re-ID).
The filter's floors are calibrated on the same images, and the pixel space is the same one: for
a release made by this tool, the pixel test at the 1st percentile restates the filter's pixel
floor and cannot fail; it speaks for releases made otherwise (`audit --release`) and for leaks
that reach a release after the filter. What an honest image of a new patient gets is the
baseline of every figure, and every verdict is a one-sided test against that baseline
(`privacy.significance`), corrected together (Holm) so that an honest release fails any of them
with probability at most `audit.alpha`:

* re-identification: share of released images the audit's re-ID network links to some
  training patient (its k nearest in re-ID space) beyond what held-out images reach: linked
  means a best score above the held-out images' `privacy.reid_heldout_quantile` quantile, so
  held-out images are linked at about 1 - that quantile by construction. Test: the count of
  linked released images, exact beta-binomial;
* distance to closest record (DCR), in the audit embedder's space and in pixels: quantiles, and
  the share closer than the held-out images' 1st percentile (about 0.01 when private). Tests:
  the count below the held-out 1st percentile, and the count below the closest held-out image
  (which a few exact copies already fail), beta-binomial;
* membership inference: ROC-AUC of a distance attack and a density-ratio attack telling training
  from held-out images with the released set in hand (0.5: the set reveals no membership), with
  patient-level permutation p-values and bootstrap intervals. Its non-members are the held-out
  split's: a test split collected apart (Kermany's official one) differs in kind, which the
  density attack measures instead of membership (AUC 0.63 for a set that scores 0.50 against
  validation, BENCHMARKS.md);
* predicate singling-out: how often "re-ID score with s >= t" isolates exactly one patient of
  the whole training population when s is a released image, minus the same rate when s is a
  held-out image, with a permutation p-value;
* planted copies: training images perturbed slightly (`privacy.planted`): the share the audit
  flags (re-ID link, or a DCR below the held-out 1st percentile in either space). A check of the
  audit, not of the release: it is not one of the corrected tests;
* identity probes: unseen images of training patients that `prepare` held back from every model
  (`data.split`): how often the audit's re-ID network links them, and to their own patient,
  beside held-out patients' images. The leak a re-ID network exists for, on this very dataset:
  it shows whether, and how well, this audit sees identity. Also a check of the audit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from unpersonal.artifacts.embedder import load_embedder
from unpersonal.artifacts.reid import ReidScorer, load_reid
from unpersonal.config import AuditConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.data.split import PROBE
from unpersonal.evaluation.plots import png_bytes, pyplot
from unpersonal.evaluation.sets import AUDIT_EMBEDDER, AUDIT_REID
from unpersonal.privacy.attacks import (dcr_summary, distance_to_closest_record,
                                        membership_inference, reid_rate, singling_out)
from unpersonal.privacy.floor import AlignedPixels
from unpersonal.privacy.planted import plant_copies
from unpersonal.privacy.significance import exceedance_test, holm, order_statistic
from unpersonal.progress import console

SCHEMA = 2
SPACES = ("embedding", "pixel")
PSO_HELDOUT_QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class SetVectors:
    """What the audit needs of each image of a set, computed once: its re-ID embedding, its
    audit-embedder features, and its aligned-pixel distance to the closest training image.

    The benchmarks build many releases from the same images (`privacy.leaks`); they describe
    each image once and assemble the releases from these rows."""

    reid: np.ndarray
    features: np.ndarray
    pixel_dcr: np.ndarray

    def __len__(self) -> int:
        return len(self.reid)

    def take(self, rows: np.ndarray) -> SetVectors:
        return SetVectors(self.reid[rows], self.features[rows], self.pixel_dcr[rows])

    def replaced(self, positions: np.ndarray, other: SetVectors) -> SetVectors:
        """These rows with `positions` (bool or indices) taken from `other`, in order."""
        reid, features, pixel = self.reid.copy(), self.features.copy(), self.pixel_dcr.copy()
        reid[positions], features[positions], pixel[positions] = (other.reid, other.features,
                                                                  other.pixel_dcr)
        return SetVectors(reid, features, pixel)


class AuditModels:
    """The audit's embedder and re-ID network with the real images already embedded."""

    def __init__(self, embedder: Path, reid: Path, dataset: CanonicalDataset,
                 quantile: float = 0.98, neighbours: int = 16,
                 pixels: AlignedPixels = AlignedPixels()) -> None:
        """`embedder` and `reid`: the folders of the audit's own models (audit-embedder and
        audit-reid); `quantile` of held-out images' best re-ID scores sets the any-patient
        threshold, over their `neighbours` nearest training images."""
        self.embedder = load_embedder(embedder)
        self.reid = load_reid(reid)
        self.pixels = pixels
        self.neighbours = neighbours
        self.quantile = quantile
        features = np.load(embedder / "features.npy")
        is_train = dataset.split == "train"
        self.train = dataset.subset("train")
        self.heldout_split = ("val" if len(np.unique(dataset.subset("val").patient_id)) >= 2
                              else "test")
        is_heldout = dataset.split == self.heldout_split
        self.heldout = dataset.subset(self.heldout_split)
        self.probes = dataset.subset(PROBE) if (dataset.split == PROBE).any() else None
        self.features = {"train": features[is_train]}
        images = dataset.images_float()
        self.reid_vectors = {"train": self.reid.embed(images[is_train])}
        self.pixel_index = pixels.index(images[is_train])
        # The probes' best matches depend on no baseline: found once, judged per baseline.
        self.probe_matches = (None if self.probes is None else reid_rate(
            self.reid.embed(self.probes.images_float()), self.reid_vectors["train"],
            self.reid.scorer, neighbours))
        self._use_baseline(self.heldout, SetVectors(
            self.reid.embed(images[is_heldout]), features[is_heldout],
            pixels.nearest(self.pixel_index, images[is_heldout])[0]))

    def _use_baseline(self, heldout: CanonicalDataset, vectors: SetVectors) -> None:
        """Everything the audit derives from its held-out images: their vectors, best re-ID
        scores and distances, the any-patient re-ID threshold, and the checks of the audit."""
        self.heldout, self.heldout_vectors = heldout, vectors
        self.features["heldout"] = vectors.features
        self.heldout_best = self.best_reid_scores(vectors.reid)
        self.heldout_dcr = {"embedding": distance_to_closest_record(
            vectors.features, self.features["train"], "cosine"), "pixel": vectors.pixel_dcr}
        pair = self.reid.scorer
        cutoff, _ = order_statistic(self.heldout_best, 1 - self.quantile, "above")
        self.scorer = ReidScorer(pair.scale, pair.bias, cutoff)
        self.identity_probes = identity_probe_check(self)
        self._planted: dict[tuple[int, int], dict[str, Any]] = {}

    def with_baseline(self, rows: np.ndarray) -> AuditModels:
        """These models with only `rows` (bool mask or indices) of their held-out images as the
        baseline. The benchmarks' honest releases: the other held-out patients' images,
        audited against these, are new patients' images by definition, so the share of them
        that fails is the audit's false alarm rate on this very dataset."""
        other = copy.copy(self)
        other.features = dict(self.features)
        other._use_baseline(self.heldout.rows(rows), self.heldout_vectors.take(rows))
        return other

    def best_reid_scores(self, reid_vectors: np.ndarray) -> np.ndarray:
        """Each image's highest re-ID score against its nearest training images."""
        return reid_rate(reid_vectors, self.reid_vectors["train"], self.reid.scorer,
                         self.neighbours)["max_score"]

    def planted_copies(self, count: int, seed: int) -> dict[str, Any]:
        """`planted_copy_check`, computed once per count and seed: the benchmarks audit many
        sets with the same models and seed."""
        if (count, seed) not in self._planted:
            self._planted[count, seed] = planted_copy_check(self, count, seed)
        return self._planted[count, seed]

    def describe(self, images: np.ndarray) -> SetVectors:
        """The audit's view of a set of images (float [N, R, R] in [0, 1])."""
        return SetVectors(self.reid.embed(images), self.embedder.embed(images),
                          self.pixels.nearest(self.pixel_index, images)[0])


def audit_set(models: AuditModels, images: np.ndarray, settings: AuditConfig, seed: int
              ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """All privacy figures of one set (images float [N, R, R] in [0, 1]).

    Also used by the benchmarks on sets that are not released (the training set itself, an
    unfiltered sample). Returns the figures and the DCRs for the plot.
    """
    return audit_vectors(models, models.describe(images), settings, seed)


def audit_vectors(models: AuditModels, release: SetVectors, settings: AuditConfig, seed: int
                  ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """`audit_set` from the set's `SetVectors`."""
    if len(models.heldout) < 2:
        raise ValueError("the audit needs held-out (validation or test split) images as its "
                         "baseline")
    console.print(f"audit: {len(release):,} images against {len(models.train):,} training "
                  f"images of {len(np.unique(models.train.patient_id)):,} patients")
    heldout = models.heldout_vectors
    best = models.best_reid_scores(release.reid)
    distances = {
        "embedding": {
            "synthetic": distance_to_closest_record(release.features, models.features["train"],
                                                    "cosine"),
            "heldout": models.heldout_dcr["embedding"]},
        "pixel": {"synthetic": release.pixel_dcr, "heldout": models.heldout_dcr["pixel"]}}
    tests = {"reid_rate": exceedance_test(best, models.heldout_best, 1 - models.quantile,
                                          "above")}
    for space in SPACES:
        d = distances[space]
        tests[f"dcr_{space}_q01"] = exceedance_test(d["synthetic"], d["heldout"], 0.01, "below")
        tests[f"dcr_{space}_min"] = exceedance_test(d["synthetic"], d["heldout"], 0.0, "below")
    pso = singling_out(release.reid, models.reid_vectors["train"], models.train.patient_id,
                       heldout.reid, models.scorer, pso_thresholds(models, settings),
                       heldout_patient=models.heldout.patient_id,
                       repeats=settings.pso_repeats, seed=seed)
    mia = membership_inference(models.features["train"], heldout.features, release.features,
                               heldout_patient=models.heldout.patient_id, seed=seed,
                               member_patient=models.train.patient_id)
    mia["nonmember_split"] = models.heldout_split
    p_values = {name: test["p_value"] for name, test in tests.items()}
    p_values.update({f"mia_{attack}": mia[attack]["p_value"]
                     for attack in ("distance", "density_ratio")})
    p_values["singling_out"] = pso["p_value"]
    verdicts = holm(p_values, settings.alpha)
    figures = {
        "schema": SCHEMA, "images": len(release), "heldout_split": models.heldout_split,
        "heldout_images": len(models.heldout), "training_images": len(models.train),
        "models": {"embedder": AUDIT_EMBEDDER, "reid": AUDIT_REID,
                   "reid_threshold": models.scorer.threshold,
                   "reid_pair_threshold": models.reid.scorer.threshold,
                   "reid_auc": models.reid.meta.get("auc")},
        "reid_rate": {"synthetic": tests["reid_rate"]["share"],
                      "heldout": tests["reid_rate"]["expected_share"],
                      "neighbours": models.neighbours},
        "dcr": {space: dcr_summary(d["synthetic"], d["heldout"])
                for space, d in distances.items()},
        "membership_inference": _json(mia),
        "singling_out": _json(pso),
        "tests": {"alpha": settings.alpha, "correction": "Holm",
                  "by_figure": {name: {**tests.get(name, {}), **verdicts[name]}
                                for name in p_values},
                  "passed": not any(v["rejected"] for v in verdicts.values()),
                  "detectable_copy_share": detectable_copy_share(
                      len(models.heldout), settings.alpha, len(p_values))},
        "planted_copies": (models.planted_copies(settings.planted, seed)
                           if settings.planted else None),
        "identity_probes": models.identity_probes,
    }
    return figures, distances


def detectable_copy_share(heldout_images: int, alpha: float, tests: int) -> float:
    """The share of exact copies in a large release at and above which the closest-image
    test fails whatever the rest of the release: copies all fall below the closest held-out
    image, whose chance share of new images is Beta(1, n), so the test's p-value is at most
    (1 - share)^n, within Holm's alpha / tests once (1 - share)^n <= alpha / tests. A smaller
    leak may still fail, by chance or through another test, but nothing promises it; with few
    held-out images the audit cannot promise to see a small leak at all, and the report says
    so."""
    return float(1 - (alpha / tests) ** (1 / heldout_images))


def pso_thresholds(models: AuditModels, settings: AuditConfig) -> list[float]:
    """The singling-out thresholds: the configured ones, the audit's re-ID threshold, and the
    median, 90th and 99th percentiles of held-out images' best scores, so that some thresholds
    lie where the network's scores actually fall."""
    reached = np.quantile(models.heldout_best, PSO_HELDOUT_QUANTILES)
    values = {*settings.pso_thresholds, models.scorer.threshold, *reached.tolist()}
    return sorted({round(float(v), 6) for v in values if 0 < v < 1})


def identity_probe_check(models: AuditModels) -> dict[str, Any] | None:
    """How the audit's re-ID network treats unseen images of training patients, beside
    held-out patients' images: linked (above the audit's threshold), linked to their own
    patient, the ROC-AUC of the best score between the two, and the exceedance test's p-value
    (small: the audit sees identity here). None when the run has no probes."""
    probes, found = models.probes, models.probe_matches
    if probes is None or found is None or len(probes) == 0:
        return None
    linked = found["max_score"] > models.scorer.threshold
    own = models.train.patient_id[found["best_row"]] == probes.patient_id
    heldout = models.heldout_best
    test = exceedance_test(found["max_score"], heldout, 1 - models.quantile, "above")
    truth = np.r_[np.ones(len(probes)), np.zeros(len(heldout))]
    return {"images": len(probes), "linked": float(linked.mean()),
            "linked_to_own_patient": float((linked & own).mean()),
            "best_match_own_patient": float(own.mean()),
            "heldout_linked": test["expected_share"], "p_value": test["p_value"],
            "auc_vs_heldout": float(roc_auc_score(truth, np.r_[found["max_score"], heldout]))}


def planted_copy_check(models: AuditModels, count: int, seed: int) -> dict[str, Any]:
    """Near-copies of training images mixed in: the share the audit flags, per perturbation.

    Flagged: linked by re-ID, or closer to a training image than the held-out 1st percentile
    in either space (the cutoffs of the DCR tests). An audit that misses these could not vouch
    for anything. It depends on the models and the seed alone, not on the set audited.
    """
    rng = np.random.default_rng([seed, 5])
    count = min(count, len(models.train))
    rows = rng.choice(len(models.train), count, replace=False)
    cutoffs = {space: order_statistic(d, 0.01, "below")[0]
               for space, d in models.heldout_dcr.items()}
    caught = {}
    for name, copies in plant_copies(models.train.images_float()[rows], seed=seed).items():
        vectors = models.describe(copies)
        linked = models.best_reid_scores(vectors.reid) > models.scorer.threshold
        close_embedding = distance_to_closest_record(
            vectors.features, models.features["train"], "cosine") < cutoffs["embedding"]
        close_pixels = vectors.pixel_dcr < cutoffs["pixel"]
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
