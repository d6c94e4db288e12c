"""The privacy audit's attacks as pure functions of embeddings, so each has a known-answer test.

Every figure here sets what the synthetic set reveals about the training patients beside what it
reveals about patients nobody trained on. A re-ID rate of 3% means nothing alone: an honest image
of a new patient also resembles some training patient now and then, and the held-out images
measure how often. So each attack is run twice, or carries its own reference:

    reid_rate              synthetic vs held-out images linked to any training patient
    dcr_summary            distances to the closest training image, synthetic vs held-out
    membership_inference   can the synthetic set tell training images from held-out ones? (AUC)
    singling_out           do synthetic images' low-weight predicates isolate one training
                           patient more often than held-out images' do? (excess rate,
                           permutation interval and p-value)

Inputs are unit-norm embeddings [N, D] (the re-ID network's or the embedder's); patient ids are
any array of hashable labels, one per row. Nothing here loads a model: a re-ID network enters as
a `ReidScorer` (`unpersonal.artifacts.reid`), its three published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from unpersonal.artifacts.reid import ReidScorer
from unpersonal.privacy.knn import METRICS, Metric, NeighbourIndex
from unpersonal.privacy.significance import auc_test, order_statistic

UNIT_TOLERANCE = 1e-3  # embeddings are stored as float32: their norms are 1 to ~1e-7
DCR_QUANTILES = {"q01": 0.01, "q05": 0.05, "q25": 0.25, "median": 0.5}
LOG_DISTANCE_FLOOR = 1e-12  # an exact copy has distance 0; its log must stay finite
MIA_FALSE_POSITIVE_RATE = 0.01  # the low-error regime where a membership attack does harm
SCORE_BUDGET = 1 << 24  # float64 scores held at once (128 MiB): synthetic rows per chunk


# ---- re-identification ----

def reid_rate(queries: np.ndarray, train: np.ndarray, scorer: ReidScorer, k: int = 16,
              exact_max: int = 50_000) -> dict:
    """Share of query images the re-ID network links to any training patient.

    The score rises with the cosine, so a query's highest score is against its nearest training
    embeddings: only the `k` nearest are scored (in float64), which is exact with an exact index
    and robust to the few neighbours an approximate one (above `exact_max` rows) misses.
    Run it on the synthetic set for the figure and on held-out real images for the reference:
    the rate an honest image of a new patient gets.

    Returns {"rate", "linked" bool [M], "max_score" float64 [M], "best_row" (the training row
    of each query's highest score) int [M], "threshold"}.
    """
    queries, train = _unit_rows(queries, "queries"), _unit_rows(train, "training embeddings")
    _same_dim(queries, train)
    _, nearest = NeighbourIndex("cosine", exact_max=exact_max).fit(train).search(
        queries, min(k, len(train)))
    found = nearest >= 0  # an approximate index may return fewer than k neighbours
    cosine = np.einsum("md,mkd->mk", queries.astype(np.float64),
                       train[np.where(found, nearest, 0)].astype(np.float64))
    scores = np.where(found, scorer.score(cosine), -np.inf)
    max_score = scores.max(axis=1)
    linked = max_score >= scorer.threshold
    best_row = nearest[np.arange(len(nearest)), scores.argmax(axis=1)]
    return {"rate": float(linked.mean()), "linked": linked, "max_score": max_score,
            "best_row": best_row, "threshold": float(scorer.threshold)}


# ---- distance to the closest record ----

def distance_to_closest_record(queries: np.ndarray, train: np.ndarray,
                               metric: Metric = "cosine", exact_max: int = 50_000) -> np.ndarray:
    """Each query's distance to its nearest training vector, float64 [M] (1 - cos for cosine)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    queries, train = _matrix(queries, "queries"), _matrix(train, "training vectors")
    _same_dim(queries, train)
    distances, _ = NeighbourIndex(metric, exact_max=exact_max).fit(train).search(queries, 1)
    return distances[:, 0].astype(np.float64)


def dcr_summary(synthetic_dcr: np.ndarray, heldout_dcr: np.ndarray) -> dict:
    """Quantiles of both distance sets, and how many fall below the held-out 1st percentile.

    Held-out images are real images of patients not trained on, so their distances show how
    close a new patient naturally comes to the training set. The held-out 1st percentile is the
    j-th closest held-out image with j / (n + 1) nearest 0.01 (`significance.order_statistic_rank`),
    the cutoff `significance.exceedance_test` tests against: a new patient's image falls below it
    with probability j / (n + 1) ("heldout_share_below", the reference), so a private synthetic
    set has about that share of its images below it, and a set that copies training images has
    many more.
    """
    synthetic = _finite_vector(synthetic_dcr, "synthetic distances")
    heldout = _finite_vector(heldout_dcr, "held-out distances")
    cutoff, rank = order_statistic(heldout, 0.01, "below")
    return {"synthetic": _quantiles(synthetic), "heldout": _quantiles(heldout),
            "heldout_q01": cutoff,
            "synthetic_share_below": float(np.mean(synthetic < cutoff)),
            "heldout_share_below": rank / (len(heldout) + 1),
            "n_synthetic": len(synthetic), "n_heldout": len(heldout)}


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {name: float(np.quantile(values, q)) for name, q in DCR_QUANTILES.items()}


# ---- membership inference ----

def membership_inference(train_members: np.ndarray, heldout_nonmembers: np.ndarray,
                         synthetic: np.ndarray, reference: np.ndarray | None = None,
                         heldout_patient: np.ndarray | None = None, k: int = 1,
                         metric: Metric = "cosine", seed: int = 0,
                         exact_max: int = 50_000, member_patient: np.ndarray | None = None
                         ) -> dict:
    """How well an attacker holding the synthetic set tells training images from held-out ones.

    Two attacks score each candidate x (higher = "member"):

      distance:       -d(x, nearest synthetic image). A generator that memorised x puts a
                      synthetic image next to it.
      density_ratio:  log p_synthetic(x) / p_reference(x) with k-nearest-neighbour densities,
                      p(x) ~ k / (N r_k(x)^D) (as DOMIAS, van Breugel et al. 2023). Dividing by
                      the density of real images of the same kind removes "x lies where images
                      are common anyway", which the distance attack confuses with memorisation.

    The reference population must be real images of patients that are neither members nor the
    non-members scored. Without `reference`, the held-out images are split in two halves, seeded:
    one half is scored as non-members, the other is the reference. Give `heldout_patient` so the
    split is by patient: a non-member whose own patient's other images sat in the reference
    would find reference neighbours unusually close and look less like a member than it should,
    inflating the AUC of an honest set.

    k = 1 by default: a generator that memorised an image typically returns it once, a single
    synthetic point that a larger k smooths away (on test data k = 5 lost most of the AUC of
    planted copies that k = 1 and 2 found perfectly).

    The AUC does not depend on D or on the metric chosen for unit vectors (cosine distance is
    half the squared euclidean one): both only rescale the log distance ratio. Members and
    non-members are subsampled (seeded) to equal counts. 0.5 is ideal; "tpr_at_fpr" is the
    share of members caught while 1% of non-members are wrongly accused, "tpr_at_fpr_0.001"
    while 0.1% are (read off the ROC curve between non-members when there are fewer than 1,000).

    With both `member_patient` and `heldout_patient`, each attack's AUC is also tested against
    0.5 (`significance.auc_test`: a patient-level permutation p-value and bootstrap interval).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    members = _unit_rows(train_members, "members")
    heldout = _unit_rows(heldout_nonmembers, "non-members")
    synthetic = _unit_rows(synthetic, "synthetic embeddings")
    rng = np.random.default_rng(seed)
    nonmember_patient = heldout_patient
    if reference is None:
        scored, reference_kind = _split_reference(heldout, heldout_patient, rng)
        nonmembers, reference = heldout[scored], heldout[~scored]
        if heldout_patient is not None:
            nonmember_patient = np.asarray(heldout_patient)[scored]
    else:
        nonmembers, reference_kind = heldout, "given"
        reference = _unit_rows(reference, "reference embeddings")
    for other in (nonmembers, synthetic, reference):
        _same_dim(members, other)
    if min(len(synthetic), len(reference)) < k:
        raise ValueError(f"the density attack needs at least k={k} synthetic and reference "
                         f"images, got {len(synthetic)} and {len(reference)}")
    chosen_members, chosen_nonmembers = _equal_sizes(len(members), len(nonmembers), rng)
    members, nonmembers = members[chosen_members], nonmembers[chosen_nonmembers]
    candidates = np.concatenate([members, nonmembers])
    truth = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]

    to_synthetic = _kth_distances(synthetic, candidates, k, metric, exact_max)
    to_reference = _kth_distances(reference, candidates, k, metric, exact_max)
    dim = members.shape[1]
    log_ratio = (np.log(len(reference) / len(synthetic))
                 + dim * (_log_distance(to_reference[:, -1]) - _log_distance(to_synthetic[:, -1])))
    result = {"distance": _attack_result(truth, -to_synthetic[:, 0]),
              "density_ratio": _attack_result(truth, log_ratio),
              "n_members": len(members), "n_nonmembers": len(nonmembers),
              "n_reference": len(reference), "reference": reference_kind, "k": k}
    if member_patient is not None and nonmember_patient is not None:
        # Tagged so that a member and a non-member with the same id stay two patients.
        patient = np.concatenate([
            [f"m{value}" for value in np.asarray(member_patient)[chosen_members]],
            [f"n{value}" for value in np.asarray(nonmember_patient)[chosen_nonmembers]]])
        for attack, scores in (("distance", -to_synthetic[:, 0]), ("density_ratio", log_ratio)):
            tested = auc_test(scores, truth.astype(bool), patient, seed=seed)
            result[attack].update(p_value=tested["p_value"], auc_ci=tested["ci"])
    return result


def _split_reference(heldout: np.ndarray, patients: np.ndarray | None, rng: np.random.Generator
                     ) -> tuple[np.ndarray, str]:
    """Which held-out images are scored as non-members (the rest are the reference), halves
    by patient when ids exist."""
    if patients is None:
        in_reference = np.zeros(len(heldout), bool)
        in_reference[rng.permutation(len(heldout))[:len(heldout) // 2]] = True
        kind = "held-out half (by image)"
    else:
        codes, count = _patient_codes(patients, len(heldout), "heldout_patient")
        if count < 2:
            raise ValueError("splitting the held-out images by patient needs two patients")
        chosen = rng.permutation(count)[:count // 2]
        in_reference = np.isin(codes, chosen)
        kind = "held-out half (by patient)"
    if in_reference.all() or not in_reference.any():
        raise ValueError("too few held-out images to split into non-members and a reference")
    return ~in_reference, kind


def _equal_sizes(a: int, b: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of both sets subsampled (seeded) to the smaller count: the AUC itself would not
    need it, but the share caught at 1% false positives and any interval on it are read per
    side."""
    count = min(a, b)
    return _subsample(a, count, rng), _subsample(b, count, rng)


def _subsample(rows: int, count: int, rng: np.random.Generator) -> np.ndarray:
    if rows == count:
        return np.arange(rows)
    return np.sort(rng.choice(rows, count, replace=False))


def _kth_distances(base: np.ndarray, queries: np.ndarray, k: int, metric: Metric,
                   exact_max: int) -> np.ndarray:
    distances, _ = NeighbourIndex(metric, exact_max=exact_max).fit(base).search(queries, k)
    return distances.astype(np.float64)


def _log_distance(distances: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(distances, LOG_DISTANCE_FLOOR))


def _attack_result(truth: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    false_positive, true_positive, _ = roc_curve(truth, scores)
    return {"auc": float(roc_auc_score(truth, scores)),
            "tpr_at_fpr": float(np.interp(MIA_FALSE_POSITIVE_RATE, false_positive,
                                          true_positive)),
            "tpr_at_fpr_0.001": float(np.interp(0.001, false_positive, true_positive))}


# ---- predicate singling out ----

def singling_out(synthetic: np.ndarray, train: np.ndarray, train_patient: np.ndarray,
                 heldout: np.ndarray, scorer: ReidScorer, thresholds: Sequence[float],
                 heldout_patient: np.ndarray | None = None, repeats: int = 999, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Predicate singling out (Cohen & Nissim 2020) of the whole training population.

    Each released image s and threshold t define the predicate "some image of the patient has a
    re-ID score with s of at least t". It isolates when exactly one training patient satisfies
    it. Some predicates isolate someone by chance, so the same predicates are built from
    held-out real images (patients nobody trained on), which know nothing of the training
    patients, and evaluated on the same population, all of it:

        excess(t) = share of released images whose predicate isolates a training patient
                  - the same share for held-out images

    Only predicates of low weight count. A predicate's weight is the share of patients it
    matches; a predicate of weight w isolates someone by chance in a population of n about
    n w (1 - w)^(n-1) of the time, which rises with w up to w = 1/n. Singling out, as Cohen and
    Nissim define it, is isolating with a predicate of weight well below 1/n, and only there
    does this chance fall as the predicates know less. Above it the comparison confounds
    weight with knowledge: a release whose images all lie a little farther from everyone than
    new patients' images do (a generator slightly off the data, which singles out nobody)
    matches fewer patients at a low threshold and so isolates someone more often. So the
    thresholds kept are those at which the pooled released and held-out predicates match at
    most one patient on average (weight at most 1/n; the highest threshold if none does), chosen
    from the pooled sets so that the permutations below stay exact. There a release farther
    from everyone isolates less, and a copy, whose own patient scores near 1 whatever the
    threshold, more. The held-out predicates' weight is reported per threshold kept
    ("weight").

    The uncertainty comes from permutations: if the released set knew no more of the training
    patients than new patients' images do, released and held-out images would be exchangeable.
    Each of `repeats` draws pools them, reassigns which are "released" at random, and takes the
    same difference. A held-out patient's images move together (`heldout_patient`; each
    released image is its own unit): they isolate together, and moving them apart would make
    the null too narrow (with three images per held-out patient, an honest release then fails
    about three times as often as it should). Each threshold's difference is divided by its
    null spread (a max-T test), so that the few isolations of a rare, telling predicate are not
    drowned by the chance swings of a common one. The band [low, high] holds these studentized
    null differences at every threshold at once in `level` of the draws, and each threshold's
    interval is [excess - high * spread, excess - low * spread] (simultaneous, so picking the
    threshold of the largest excess keeps its coverage). The threshold reported ("max_threshold",
    "max_excess") is the one of the largest studentized excess; "p_value" (one-sided: only an
    excess harms) is the share of draws whose largest studentized null difference reaches it,
    at least 1 / (repeats + 1). "significant" means that threshold's interval lies above 0.
    """
    synthetic = _unit_rows(synthetic, "synthetic embeddings")
    train, heldout = _unit_rows(train, "training embeddings"), _unit_rows(heldout, "held-out")
    _same_dim(synthetic, train)
    _same_dim(synthetic, heldout)
    thresholds = _checked_thresholds(thresholds)
    if repeats < 1 or not 0 < level < 1:
        raise ValueError(f"need repeats >= 1 and 0 < level < 1, got {repeats}, {level}")
    train_sorted, starts = _grouped(train, train_patient, "train_patient")
    matched = np.concatenate([_matched_patients(rows, train_sorted, starts, scorer, thresholds)
                              for rows in (synthetic, heldout)])
    low_weight = matched.mean(axis=0) <= 1
    kept = low_weight if low_weight.any() else thresholds == thresholds.max()
    dropped, thresholds, matched = thresholds[~kept], thresholds[kept], matched[:, kept]
    matched_heldout = matched[len(synthetic):]
    isolating = (matched == 1).astype(np.float64)
    released = np.arange(len(isolating)) < len(synthetic)
    unit = _permutation_units(len(synthetic), len(heldout), heldout_patient)
    units = int(unit.max()) + 1
    rng = np.random.default_rng(seed)
    null = np.empty((repeats, len(thresholds)))
    for draw in range(repeats):
        shuffled = (rng.permutation(units) < len(synthetic))[unit]
        null[draw] = isolating[shuffled].mean(axis=0) - isolating[~shuffled].mean(axis=0)
    train_rate, heldout_rate = isolating[released].mean(axis=0), isolating[~released].mean(axis=0)
    excess = train_rate - heldout_rate
    # Studentized by each threshold's null spread, so that a rare, telling predicate (a high
    # threshold, few isolations) is not drowned by the chance swings of a common one.
    width = null.std(axis=0)  # 0 at a threshold nobody ever reaches: its interval is a point
    spread = np.where(width > 0, width, np.inf)  # ... and its z is 0
    z, null_z = excess / spread, null / spread
    tail = (1 - level) / 2
    low = np.quantile(null_z.min(axis=1), tail)
    high = np.quantile(null_z.max(axis=1), 1 - tail)
    ci = np.clip(np.stack([excess - high * width, excess - low * width], axis=1), -1, 1)
    best = int(np.argmax(z))
    exceeding = int(np.sum(null_z.max(axis=1) >= z[best] - 1e-12))
    patients = len(starts)
    return {"thresholds": thresholds, "high_weight_thresholds": dropped,
            "train_rate": train_rate, "heldout_rate": heldout_rate,
            "excess": excess, "excess_ci": ci,
            "weight": matched_heldout.mean(axis=0) / patients,
            "max_excess": float(excess[best]), "max_threshold": float(thresholds[best]),
            "max_ci": (float(ci[best, 0]), float(ci[best, 1])),
            "significant": bool(ci[best, 0] > 0),
            "p_value": (1 + exceeding) / (1 + repeats),
            "population_size": patients, "repeats": repeats, "level": level,
            "n_synthetic": len(synthetic), "n_heldout": len(heldout)}


def _permutation_units(synthetic: int, heldout: int, heldout_patient: np.ndarray | None
                       ) -> np.ndarray:
    """Each row's unit of exchange, 0..U-1: released images one each, then held-out patients
    (held-out images one each when no patient ids are given)."""
    if heldout_patient is None:
        return np.arange(synthetic + heldout)
    codes, _ = _patient_codes(heldout_patient, heldout, "heldout_patient")
    return np.r_[np.arange(synthetic), synthetic + codes]


def _grouped(images: np.ndarray, patients: np.ndarray, what: str
             ) -> tuple[np.ndarray, np.ndarray]:
    """(images reordered so that each patient's rows are contiguous, first row of each)."""
    codes, _ = _patient_codes(patients, len(images), what)
    order = np.argsort(codes, kind="stable")
    return images[order], np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])


def _matched_patients(rows: np.ndarray, images: np.ndarray, starts: np.ndarray,
                      scorer: ReidScorer, thresholds: np.ndarray) -> np.ndarray:
    """How many patients satisfy each row's predicate at each threshold: int [rows, thresholds],
    from images grouped by `_grouped`, in chunks that keep the score matrix within
    SCORE_BUDGET."""
    out = np.zeros((len(rows), len(thresholds)), np.int64)
    chunk = max(1, SCORE_BUDGET // len(images))
    for start in range(0, len(rows), chunk):
        best = np.maximum.reduceat(scorer.score_matrix(rows[start:start + chunk], images), starts,
                                   axis=1)  # each patient's best score with each row
        out[start:start + chunk] = (best[:, :, None] >= thresholds).sum(axis=1)
    return out


def _checked_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    values = np.unique(np.asarray(thresholds, dtype=np.float64).reshape(-1))
    if len(values) == 0 or len(values) > 255 or not ((values > 0) & (values < 1)).all():
        raise ValueError(f"need 1..255 thresholds on the score, each in (0, 1), got {thresholds}")
    return values


# ---- input checks ----

def _patient_codes(patients: np.ndarray, rows: int, what: str) -> tuple[np.ndarray, int]:
    """Patient ids of any hashable kind -> (codes 0..P-1 per row, P)."""
    patients = np.asarray(patients)
    if patients.ndim != 1 or len(patients) != rows:
        raise ValueError(f"{what} needs one id per image: {rows} images, shape {patients.shape}")
    ids, codes = np.unique(patients, return_inverse=True)
    return codes.reshape(-1), len(ids)


def _unit_rows(vectors: np.ndarray, what: str) -> np.ndarray:
    """A non-empty [N, D] matrix of unit-norm rows: re-ID scores are computed as plain dot
    products, which are cosines only for unit vectors (raw features would score nonsense)."""
    vectors = _matrix(vectors, what)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    if np.abs(norms - 1).max() > UNIT_TOLERANCE:
        raise ValueError(f"{what} must be unit-norm embeddings; norms range "
                         f"{norms.min():.4g}..{norms.max():.4g}")
    return vectors


def _matrix(vectors: np.ndarray, what: str) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] == 0 or len(vectors) == 0:
        raise ValueError(f"{what} must be a non-empty [N, D] array, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what} contain NaN or inf values")
    return vectors


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings of {a.shape[1]} and {b.shape[1]} dimensions cannot be "
                         "compared")


def _finite_vector(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) == 0 or not np.isfinite(values).all():
        raise ValueError(f"{what} must be a non-empty array of finite numbers")
    return values
