"""The per-source search of `generate`: draw candidates, judge them, keep the best survivor.

Pure code over two callables, so it runs (and is tested) without any model:

    draw(requests)              -> Candidates   images for (position, attempt, candidate) rows
    judge(requests, candidates) -> Judgement    privacy verdict, label divergence, scores

For each source (a position of the source order) the search draws candidates in rounds: `best`
draws all K of an attempt at once, `first` draws `round_size` at a time and stops at the first
round whose best survivor's labels agree within `tolerance`. A survivor passed every privacy
check and, with `label_gate`, is within `tolerance`. When an attempt has drawn K candidates
its best survivor (and with `keep_second` the next) is kept; with none, the next attempt starts
(the caller's `draw` lowers the guidance for it), and after `attempts` the source is skipped.

Every source still searching takes part in every round, so the candidates of a round are drawn
in one call whatever the block's other sources did: a block's batches, and so its images,
depend only on the block. Each decision row's outcome is written once, when the block ends: its
verdict (rejected:<checks>, rejected:label, survivor) unless its source kept it (accepted,
accepted:second).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from unpersonal.config import GenerateConfig

KEPT = ("accepted", "accepted:second")  # the outcome of a source's best and second-best


@dataclass(frozen=True)
class Requests:
    """Candidates to draw, one row each: its source's position, attempt and number in it."""

    positions: np.ndarray
    attempts: np.ndarray
    candidates: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class Candidates:
    """What `draw` made of `Requests`, row for row."""

    images: np.ndarray
    """[M, R, R] at the data's bit depth."""
    seeds: np.ndarray
    source_rows: np.ndarray
    """The training row each was drawn for."""
    guidance: np.ndarray
    from_source: np.ndarray
    """Whether each was conditioned on its source's image (not the labels alone)."""
    evaluations: int
    """Network evaluations spent on all of them."""


@dataclass(frozen=True)
class Judgement:
    """What `judge` found, row for row."""

    reasons: list[str]
    """The privacy checks that rejected each candidate, joined by '+'; '' when it passed."""
    divergence: np.ndarray
    """How far the classifier's opinion of it is from its opinion of its source."""
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    """Columns for the decision log (scores, thresholds, ...), by name."""


Draw = Callable[[Requests], Candidates]
Judge = Callable[[Requests, Candidates], Judgement]


@dataclass(frozen=True)
class Block:
    """A searched block: its kept images and every candidate's decision row."""

    positions: np.ndarray
    """The sources' positions in the source order."""
    images: np.ndarray
    """The kept images [K, R, R], by position, best first."""
    image_position: np.ndarray
    image_rank: np.ndarray
    """0 for a source's best survivor, 1 for its second."""
    image_source_row: np.ndarray
    image_decision: np.ndarray
    """Each kept image's row in `decisions`."""
    attempts_used: np.ndarray
    skipped: np.ndarray
    evaluations: int
    decisions: dict[str, np.ndarray]
    """One row per candidate, in drawing order: request, drawing and judgement columns, and
    `outcome`."""
    seconds: float = 0.0


@dataclass(frozen=True)
class _Source:
    """One source's search so far."""

    attempt: int = 0
    drawn: int = 0
    """Candidates drawn in the current attempt."""
    survivors: tuple[tuple[float, int, int], ...] = ()
    """(divergence, candidate, decision row) of the current attempt's survivors."""
    kept: tuple[int, ...] = ()
    """Decision rows kept, best first: set when the source ends with a survivor."""
    skipped: bool = False

    @property
    def done(self) -> bool:
        return bool(self.kept) or self.skipped


def search_block(positions: np.ndarray, settings: GenerateConfig, draw: Draw, judge: Judge
                 ) -> Block:
    """Search for every source at `positions` until each keeps a survivor or is skipped."""
    sources = [_Source() for _ in positions]
    columns: dict[str, list] = {}
    verdicts: list[str] = []
    images: list[np.ndarray] = []
    evaluations = 0
    while not all(source.done for source in sources):
        local, requests = _requests(positions, sources, settings)
        candidates = draw(requests)
        judgement = judge(requests, candidates)
        evaluations += candidates.evaluations
        first_row = len(verdicts)
        round_verdicts = [_verdict(reason, float(divergence), settings)
                          for reason, divergence in zip(judgement.reasons, judgement.divergence)]
        _extend(columns, _decision_columns(requests, candidates, judgement))
        verdicts += round_verdicts
        images += list(candidates.images)
        for i in np.unique(local):
            mine = np.flatnonzero(local == i)
            survivors = [(float(judgement.divergence[j]), int(requests.candidates[j]),
                          first_row + int(j)) for j in mine if round_verdicts[j] == "survivor"]
            sources[i] = _after_round(sources[i], survivors, len(mine), settings)
    return _block(positions, sources, columns, verdicts, images, evaluations)


def _requests(positions: np.ndarray, sources: list[_Source], settings: GenerateConfig
              ) -> tuple[np.ndarray, Requests]:
    """This round's candidates: every source still searching draws its next ones."""
    local, attempts, numbers = [], [], []
    for i, source in enumerate(sources):
        if source.done:
            continue
        left = settings.candidates - source.drawn
        take = left if settings.mode == "best" else min(settings.round_size, left)
        local += [i] * take
        attempts += [source.attempt] * take
        numbers += range(source.drawn, source.drawn + take)
    local_array = np.array(local)
    return local_array, Requests(positions[local_array], np.array(attempts), np.array(numbers))


def _verdict(reason: str, divergence: float, settings: GenerateConfig) -> str:
    """A candidate's verdict on its own, before its source chooses among its survivors."""
    if reason:
        return f"rejected:{reason}"
    if settings.label_gate and divergence > settings.tolerance:
        # It would carry a label the classifier does not see in it: label noise that costs the
        # release its utility (a quarter of the accepted images on Kermany before this check).
        return "rejected:label"
    return "survivor"


def _after_round(source: _Source, survivors: list[tuple[float, int, int]], drawn_now: int,
                 settings: GenerateConfig) -> _Source:
    """A source after a round: it keeps its best survivor(s) and ends, or goes on drawing, or
    starts a new attempt (or, out of attempts, is skipped)."""
    drawn = source.drawn + drawn_now
    ranked = sorted((*source.survivors, *survivors))  # smallest divergence, then earliest
    good_enough = settings.mode == "first" and ranked and ranked[0][0] <= settings.tolerance
    if good_enough or (drawn >= settings.candidates and ranked):
        best = ranked[: 2 if settings.keep_second else 1]
        return _Source(source.attempt, drawn, kept=tuple(row for _, _, row in best))
    if drawn >= settings.candidates:
        attempt = source.attempt + 1
        return _Source(attempt, skipped=attempt >= settings.attempts)
    return _Source(source.attempt, drawn, tuple(ranked))


def _decision_columns(requests: Requests, candidates: Candidates, judgement: Judgement
                      ) -> dict[str, list]:
    """A round's decision rows as columns of Python values (the outcome comes at the end)."""
    arrays = {"position": requests.positions, "source_row": candidates.source_rows,
              "attempt": requests.attempts, "candidate": requests.candidates,
              "seed": candidates.seeds, "guidance": candidates.guidance,
              "drawn_from_source": candidates.from_source, **judgement.scores,
              "divergence": judgement.divergence}
    return {name: np.asarray(values).tolist() for name, values in arrays.items()}


def _extend(columns: dict[str, list], more: dict[str, list]) -> None:
    for name, values in more.items():
        columns.setdefault(name, []).extend(values)


def _block(positions: np.ndarray, sources: list[_Source], columns: dict[str, list],
           verdicts: list[str], images: list[np.ndarray], evaluations: int) -> Block:
    """The block's arrays, kept images ordered by position, then rank."""
    kept = sorted(((int(positions[i]), rank, row) for i, source in enumerate(sources)
                   for rank, row in enumerate(source.kept)))
    rows = [row for _, _, row in kept]
    rank_of = {row: rank for _, rank, row in kept}
    outcome = [KEPT[rank_of[row]] if row in rank_of else verdict
               for row, verdict in enumerate(verdicts)]
    source_row = np.array(columns["source_row"])
    return Block(
        positions=positions.astype(np.int64),
        images=(np.stack([images[row] for row in rows]) if rows
                else np.zeros((0, *images[0].shape), images[0].dtype)),
        image_position=np.array([position for position, _, _ in kept], np.int64),
        image_rank=np.array([rank for _, rank, _ in kept], np.int64),
        image_source_row=source_row[rows].astype(np.int64),
        image_decision=np.array(rows, np.int64),
        attempts_used=np.array([s.attempt + (0 if s.skipped else 1) for s in sources], np.int64),
        skipped=np.array([s.skipped for s in sources]),
        evaluations=evaluations,
        decisions={**{name: np.array(values) for name, values in columns.items()},
                   "outcome": np.array(outcome)})
