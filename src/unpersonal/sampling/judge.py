"""How `generate` judges a candidate: the privacy filter, then its labels against its source's.

    judge = CandidateJudge(privacy_filter, policy, classifier, label_kind, rule, bit_depth)
    judgement = judge.for_sources(positions, source_images)(requests, candidates)

The privacy filter (`privacy.filter`) decides whether the candidate may leave at all; the label
divergence, how far the classifier's opinion of it is from its opinion of its source, decides
which survivor is kept and (with `generate.label_gate`) whether one that would carry a label
the classifier does not see in it survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unpersonal.artifacts.classifier import Classifier
from unpersonal.privacy.filter import FilterPolicy, FilterResult, PrivacyFilter
from unpersonal.sampling.search import Candidates, Judgement, Requests

PROBABILITY_CLIP = 1e-6


def _as_distributions(probs: np.ndarray, label_kind: str) -> np.ndarray:
    """Classifier outputs -> [N, G, V] rows of G distributions: one categorical for
    multi-class, one Bernoulli (p, 1 - p) per label otherwise."""
    probs = np.clip(np.asarray(probs, np.float64), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    if label_kind == "multiclass":
        return (probs / probs.sum(axis=1, keepdims=True))[:, None, :]
    return np.stack([probs, 1 - probs], axis=-1)


def label_divergence(candidate: np.ndarray, source: np.ndarray, label_kind: str,
                     rule: str = "symmetric-kl") -> np.ndarray:
    """How far the classifier's opinion of each candidate is from its opinion of the source.

    Symmetric on purpose: the reference scored a one-sided BCE, which punishes a candidate that
    is surer than its source the same as one that contradicts it. Multi-label: the largest over
    the labels, so that `generate.tolerance` bounds each label's disagreement whatever their
    number (a sum would let eight nearly-agreeing labels fail a tolerance one label passes). [N]
    """
    p, q = _as_distributions(candidate, label_kind), _as_distributions(source, label_kind)
    if rule == "symmetric-kl":
        per_group = ((p - q) * (np.log(p) - np.log(q))).sum(axis=-1)
    elif rule == "jensen-shannon":
        m = (p + q) / 2
        per_group = 0.5 * (p * np.log(p / m)).sum(axis=-1) + 0.5 * (q * np.log(q / m)).sum(axis=-1)
    elif rule == "total-variation":
        per_group = 0.5 * np.abs(p - q).sum(axis=-1)
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return per_group.max(axis=1)


def to_unit(images: np.ndarray, bit_depth: int) -> np.ndarray:
    """Grey levels at `bit_depth` -> float32 in [0, 1], what the filter and classifier take."""
    return images.astype(np.float32) / float((1 << bit_depth) - 1)


@dataclass(frozen=True)
class CandidateJudge:
    """The privacy filter and the label check, before it knows its sources (`for_sources`)."""

    privacy_filter: PrivacyFilter
    policy: FilterPolicy
    classifier: Classifier
    label_kind: str
    rule: str
    """The divergence (`generate.selection`)."""
    bit_depth: int

    def for_sources(self, positions: np.ndarray, images: np.ndarray) -> SourceJudge:
        """The `Judge` of the sources at `positions` (ascending), whose images (float, in
        [0, 1]) are `images`: the classifier's opinion of each is computed here, once per block
        and for the block's sources in order, so that it depends on the block alone."""
        return SourceJudge(self, positions, self.classifier.predict_proba(images))

    def reid_thresholds(self) -> tuple[float, float]:
        """The re-ID thresholds candidates are held to: against their source (the pair
        threshold) and against any training patient; the policy's fixed one replaces both."""
        fixed = self.policy.reid_threshold
        if fixed is not None:
            return fixed, fixed
        return self.privacy_filter.reid.scorer.threshold, self.privacy_filter.any_patient_threshold

    def scores(self, checked: FilterResult) -> dict[str, np.ndarray]:
        """The decision log's columns of the filter: each score beside the threshold or floor
        it was held to."""
        count, floors = len(checked), self.privacy_filter.floors
        pair, anyone = self.reid_thresholds()
        return {"reid_score": checked.reid_score,
                "reid_source_score": checked.reid_source_score,
                "reid_threshold": np.full(count, pair),
                "reid_any_patient_threshold": np.full(count, anyone),
                "reid_nearest_row": checked.reid_nearest,
                "embedding_distance": checked.embedding_distance,
                "embedding_floor": np.full(count, floors["embedding"].value),
                "pixel_distance": checked.pixel_distance,
                "pixel_floor": np.full(count, floors["pixel"].value),
                "strictly_rejected": checked.strictly_rejected}


@dataclass(frozen=True)
class SourceJudge:
    """The `Judge` of `search` for one block's sources: privacy filter and label divergence."""

    judge: CandidateJudge
    positions: np.ndarray
    """The positions of the sources it judges for, ascending."""
    source_probs: np.ndarray
    """The classifier's output on each of those sources' images."""

    def __call__(self, requests: Requests, candidates: Candidates) -> Judgement:
        judge = self.judge
        unit = to_unit(candidates.images, judge.bit_depth)
        checked = judge.privacy_filter.check(unit, candidates.source_rows, judge.policy,
                                             candidates.from_source)
        source_probs = self.source_probs[np.searchsorted(self.positions, requests.positions)]
        divergence = label_divergence(judge.classifier.predict_proba(unit), source_probs,
                                      judge.label_kind, judge.rule)
        return Judgement([checked.reason(j) for j in range(len(checked))], divergence,
                         judge.scores(checked))
