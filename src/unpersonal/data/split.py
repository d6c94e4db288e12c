"""Patient-level train/val/test split, stratified by label.

Whole patients go to one split, so no patient's anatomy is seen in training and again in
evaluation. Patients that share an identical image (a re-used file under two IDs) are kept
together too, since the image itself would otherwise leak across splits.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from unpersonal.data.source import SPLITS


def patient_groups(patients: np.ndarray, image_hashes: list[str]) -> list[np.ndarray]:
    """Image indices grouped by patient, patients sharing an identical image merged."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    first_owner: dict[str, str] = {}
    for patient, digest in zip(patients.tolist(), image_hashes):
        owner = first_owner.setdefault(digest, patient)
        parent[root(patient)] = root(owner)
    members: dict[str, list[int]] = defaultdict(list)
    for index, patient in enumerate(patients.tolist()):
        members[root(patient)].append(index)
    return [np.array(indices) for _, indices in sorted(members.items())]


def split_patients(groups: list[np.ndarray], labels: np.ndarray,
                   fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Assign each group to a split; returns the split name per image.

    Strata are (the group's most common label vector, single- or multi-image group): each split
    then gets its share of every class and of the multi-image patients that re-identification
    needs. Within a stratum groups go, in seeded random order, to the split furthest below its
    target image count.
    """
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for group in groups:
        strata[(_dominant_label(labels[group]), len(group) > 1)].append(group)
    split = np.empty(len(labels), dtype=object)
    targets = np.asarray(fractions, dtype=np.float64)
    for key in sorted(strata, key=str):
        members = strata[key]
        order = rng.permutation(len(members))
        filled = np.zeros(len(SPLITS))
        for position in order:
            group = members[position]
            deficit = targets * (filled.sum() + len(group)) - filled
            deficit[targets == 0] = -np.inf
            choice = int(np.argmax(deficit))
            split[group] = SPLITS[choice]
            filled[choice] += len(group)
    return split.astype(str)


def _dominant_label(rows: np.ndarray) -> tuple[int, ...]:
    values, counts = np.unique(rows, axis=0, return_counts=True)
    return tuple(int(v) for v in values[int(np.argmax(counts))])
