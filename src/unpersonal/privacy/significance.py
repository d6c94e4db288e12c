"""The audit's verdicts as tests: each figure's p-value against its held-out baseline, and one
correction for testing several figures at once.

Every verdict asks "does the released set do this more than real images of patients nobody
trained on?". A verdict is a one-sided test of that question, so that it comes with a p-value,
its false alarm rate on an honest release is known (`ALPHA` for all the tests together), and
how many leaked images it takes to fail is a property of the test, measured by the leak kit
(`privacy.leaks`, `benchmarks/leaks.py`).

    exceedance_test      released images beyond the j-th most extreme held-out image
                         (re-ID score, distance to the closest training image): exact,
                         beta-binomial
    auc_test             a membership attack's ROC-AUC: patient-level permutation p-value and
                         patient-level bootstrap interval
    holm                 Holm's step-down adjustment of several p-values (family-wise error)
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 0.05  # family-wise: an honest release fails any of the verdicts this often at most


def order_statistic_rank(heldout_count: int, share: float) -> int:
    """j such that the j-th most extreme of n held-out values is exceeded by about `share` of
    new values: E[share beyond the j-th] = j / (n + 1)."""
    if heldout_count < 1:
        raise ValueError("an exceedance test needs at least one held-out value")
    return int(min(heldout_count, max(1, round(share * (heldout_count + 1)))))


def exceedance_test(released: np.ndarray, heldout: np.ndarray, share: float,
                    direction: str) -> dict[str, float | int]:
    """How many released values lie beyond the j-th most extreme held-out value, and its p-value.

    `direction` "below" (distances: a copy is close) or "above" (re-ID scores: a copy scores
    high); j from `order_statistic_rank(n, share)`. If released and held-out images were
    exchangeable (the set knows no more about the training patients than a new patient's image
    does), the chance that one released value lies beyond the cutoff is Beta(j, n + 1 - j)
    distributed, so the count of N released values beyond it is beta-binomial(N, j, n + 1 - j),
    whatever the values' distribution: the p-value is exact, with no normal approximation and no
    assumption about the score. Ties with the cutoff are not counted.
    """
    released = np.asarray(released, np.float64).reshape(-1)
    heldout = np.asarray(heldout, np.float64).reshape(-1)
    if len(released) == 0 or not np.isfinite(released).all() or not np.isfinite(heldout).all():
        raise ValueError("an exceedance test needs finite released and held-out values")
    if direction not in ("below", "above"):
        raise ValueError(f"direction must be 'below' or 'above', got {direction!r}")
    n, total = len(heldout), len(released)
    cutoff, j = order_statistic(heldout, share, direction)
    count = int(np.sum(released < cutoff if direction == "below" else released > cutoff))
    null = stats.betabinom(total, j, n + 1 - j)
    return {"cutoff": cutoff, "rank": j, "count": count, "share": count / total,
            "expected_share": j / (n + 1), "p_value": float(null.sf(count - 1))}


def order_statistic(heldout: np.ndarray, share: float, direction: str) -> tuple[float, int]:
    """The j-th lowest ("below") or highest ("above") held-out value that about `share` of new
    values lie beyond (`order_statistic_rank`), and j."""
    ordered = np.sort(np.asarray(heldout, np.float64).reshape(-1))
    j = order_statistic_rank(len(ordered), share)
    return float(ordered[j - 1] if direction == "below" else ordered[len(ordered) - j]), j


def auc_test(scores: np.ndarray, member: np.ndarray, patient: np.ndarray, permutations: int = 999,
             level: float = 0.95, seed: int = 0, rounds: int = 500
             ) -> dict[str, float | list[float]]:
    """ROC-AUC of `scores` for telling members from non-members, tested against 0.5.

    A patient's images are not independent (they look alike, and all are members or none), so
    both the p-value and the interval resample patients, not images: the p-value is the share
    of `permutations` relabellings of whole patients (as many patients members as in truth)
    whose AUC reaches the observed one; the interval is a percentile bootstrap over patients,
    members and non-members resampled apart (`rounds` resamples).
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    member = np.asarray(member, bool).reshape(-1)
    codes, patients = _patient_index(patient, len(scores))
    patient_member = np.zeros(patients, bool)
    patient_member[codes[member]] = True
    if patient_member[codes[~member]].any():
        raise ValueError("a patient has both member and non-member images")
    if member.all() or not member.any():
        raise ValueError("the attack needs both members and non-members")
    ranks = stats.rankdata(scores)
    observed = _auc_from_ranks(ranks, member)
    rng = np.random.default_rng([seed, 21])
    exceed = 0
    for _ in range(permutations):
        relabelled = rng.permutation(patient_member)[codes]
        if relabelled.all() or not relabelled.any():
            continue
        exceed += _auc_from_ranks(ranks, relabelled) >= observed - 1e-12
    low, high = _bootstrap_interval(scores, member, codes, patient_member, level, rng, rounds)
    return {"auc": observed, "p_value": (1 + exceed) / (1 + permutations),
            "ci": [low, high], "level": level, "permutations": permutations}


def _auc_from_ranks(ranks: np.ndarray, positive: np.ndarray) -> float:
    """The Mann-Whitney form of the ROC-AUC, ties counted half."""
    n_pos = int(positive.sum())
    n_neg = len(ranks) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _bootstrap_interval(scores: np.ndarray, member: np.ndarray, codes: np.ndarray,
                        patient_member: np.ndarray, level: float, rng: np.random.Generator,
                        rounds: int = 500) -> tuple[float, float]:
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=len(patient_member))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    groups = [np.flatnonzero(patient_member), np.flatnonzero(~patient_member)]
    aucs = []
    for _ in range(rounds):
        chosen = np.concatenate([rng.choice(group, len(group), replace=True) for group in groups])
        sizes = counts[chosen]
        within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        rows = order[np.repeat(starts[chosen], sizes) + within]
        aucs.append(_auc_from_ranks(stats.rankdata(scores[rows]), member[rows]))
    tail = (1 - level) / 2
    return float(np.quantile(aucs, tail)), float(np.quantile(aucs, 1 - tail))


def _patient_index(patient: np.ndarray, rows: int) -> tuple[np.ndarray, int]:
    patient = np.asarray(patient).reshape(-1)
    if len(patient) != rows:
        raise ValueError(f"one patient id per score needed: {rows} scores, {len(patient)} ids")
    ids, codes = np.unique(patient, return_inverse=True)
    return codes.reshape(-1), len(ids)


def holm(p_values: dict[str, float], alpha: float = ALPHA) -> dict[str, dict[str, float | bool]]:
    """Holm's step-down adjustment: each test's adjusted p-value and whether it fails at the
    family-wise level `alpha` (the chance that an honest release fails any test is at most
    alpha, whatever the tests' dependence)."""
    names = sorted(p_values, key=lambda name: p_values[name])
    count, running, out = len(names), 0.0, {}
    for position, name in enumerate(names):
        running = max(running, min(1.0, (count - position) * p_values[name]))
        out[name] = {"p_value": p_values[name], "p_adjusted": running,
                     "rejected": running <= alpha}
    return {name: out[name] for name in p_values}

