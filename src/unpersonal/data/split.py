"""Patient-level train/val/test split, stratified by label.

Whole patients go to one split, so no patient's anatomy is seen in training and again in
evaluation. Patients that share an identical image (a re-used file under two IDs) are kept
together too, since the image itself would otherwise leak across splits.

Every later stage needs train, val and test images, so each split with a share gets at least one
patient even on a small dataset, and `prepare` refuses a split (given or made) that leaves one
empty.

Identity probes (split "probe") are the one exception to whole patients: one image each of some
training patients with three images or more, held back from every model. They are what a
release must not contain and a re-ID network exists to catch, an unseen image of a training
patient; every audit shows how its models treat them (`evaluation.audit`), and the leak kit
leaks them (`privacy.leaks`).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from unpersonal.data.source import SPLITS
from unpersonal.errors import UserError

# Why an empty split is refused at prepare rather than by the later stage that trips over it:
# models are early-stopped and calibrated on val and scored on test.
_NEEDS_ALL = "every later stage needs train, val and test images"


PROBE = "probe"
PROBE_MIN_IMAGES = 3  # a probed patient keeps two training images: a pair to learn identity from


def hold_out_identity_probes(split: np.ndarray, patients: np.ndarray, image_hashes: list[str],
                             share: float, seed: int) -> np.ndarray:
    """`split` with one training image of each of some training patients moved to "probe".

    round(share x training images) probes at most, from distinct patients with at least
    PROBE_MIN_IMAGES training images, patients and images drawn at random (seeded). An image
    with an identical twin anywhere in the data is never a probe: it would not be unseen."""
    repeated = {digest for digest, count in Counter(image_hashes).items() if count > 1}
    unique = np.array([digest not in repeated for digest in image_hashes])
    train = np.flatnonzero((split == "train") & unique)
    wanted = int(round(share * len(train)))
    if wanted == 0:
        return split
    _, inverse, counts = np.unique(patients[train], return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts >= PROBE_MIN_IMAGES)
    rng = np.random.default_rng([seed, 41])
    chosen = np.sort(rng.choice(eligible, min(wanted, len(eligible)), replace=False))
    out = split.copy()
    for patient in chosen:
        rows = train[inverse == patient]
        out[rows[rng.integers(len(rows))]] = PROBE
    return out


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
    _fill_empty_splits(split, groups, targets)
    return split.astype(str)


def _fill_empty_splits(split: np.ndarray, groups: list[np.ndarray], targets: np.ndarray) -> None:
    """Give every split with a share at least one group, moved from the split with most groups.

    Filling each stratum on its own can leave val or test empty on a small dataset (ten patients
    in four strata: each stratum's two or three groups all go to train), and every later stage
    needs all three splits. Only a split that would be empty changes, so a dataset whose splits
    are all filled splits exactly as without this step. The group moved is the donor's smallest
    (the first such in `groups`' order), which shifts the shares least.
    """
    owner = [str(split[group[0]]) for group in groups]  # the split each group went to
    for index, name in enumerate(SPLITS):
        if targets[index] == 0 or name in owner:
            continue
        sizes = {other: owner.count(other) for other in SPLITS}
        donor = max(SPLITS, key=sizes.__getitem__)  # ties go to the first in SPLITS order
        if sizes[donor] < 2:
            return  # fewer groups than splits: check_made_split_filled refuses
        candidates = [g for g, where in enumerate(owner) if where == donor]
        moved = min(candidates, key=lambda g: len(groups[g]))
        owner[moved] = name
        split[groups[moved]] = name


def _dominant_label(rows: np.ndarray) -> tuple[int, ...]:
    values, counts = np.unique(rows, axis=0, return_counts=True)
    return tuple(int(v) for v in values[int(np.argmax(counts))])


def check_given_split_filled(split: np.ndarray, where: str) -> None:
    """Refuse a split given with the data that leaves val or test (or train) without images."""
    empty, have = _empty_and_counts(split)
    if empty:
        raise UserError(f"{where}: the split given with the data has no {_joined(empty)} images "
                        f"({have}); {_NEEDS_ALL}: put some patients in {_joined(empty)}, or give "
                        "no split and unpersonal splits by patient")


def check_made_split_filled(split: np.ndarray, fractions: tuple[float, float, float],
                            patients: int, where: str) -> None:
    """Refuse a patient-level split that left a split empty: a zero share, or too few patients.

    `patients` counts the groups that were split (patients, merged where they share an image).
    """
    empty, have = _empty_and_counts(split)
    if not empty:
        return
    unshared = [name for name in empty if fractions[SPLITS.index(name)] == 0]
    if unshared:
        raise UserError(f"data.split_fractions {list(fractions)} gives {_joined(unshared)} no "
                        f"share; {_NEEDS_ALL}: e.g. --set data.split_fractions=[0.8,0.1,0.1]")
    raise UserError(f"{where}: the patient-level split left {_joined(empty)} empty ({have}, "
                    f"{patients} patient{'s' if patients != 1 else ''} to share out); "
                    f"{_NEEDS_ALL}: bring images of more patients (3 at the very least)")


def _empty_and_counts(split: np.ndarray) -> tuple[list[str], str]:
    """The splits with no image, and the image count of each other split, as text."""
    counts = {name: int((split == name).sum()) for name in SPLITS}
    have = ", ".join(f"{count} in {name}" for name, count in counts.items() if count)
    return [name for name, count in counts.items() if count == 0], have


def _joined(names: list[str]) -> str:
    return " and ".join(names)
