"""`unpersonal generate`: diversity-aware synthetic images that no privacy check links to a patient.

For each source (a training image; every one once by default, in a seeded order), the search
(`search`) runs until the source keeps a candidate or is skipped:

1. draw candidates (`CandidateDrawer`, through the `sampler`) conditioned on the source's
   pseudo-condition and its labels, with the fast solver, the EMA weights and guidance w. The
   pseudo-condition is the source's embedding, or with `pseudo_condition: neighbours` the mean
   embedding of its nearest training images of other patients with its labels. `best` draws
   all K at once; `first` draws `round_size` at a time and stops at the first round with a
   survivor whose labels agree within `tolerance`, so the common case costs one round;
2. judge each (`judge`): the privacy filter (`privacy.filter`): re-ID against its nearest
   training images of every patient and the source (and against the source alone with the pair
   threshold, when the candidate was drawn from the source's own embedding: at guidance w = 0
   against the labels it is drawn from the labels alone), then the embedding
   and pixel distance floors; and the divergence of the classifier's output on it from its
   output on the source;
3. keep the survivor that diverges least (and, with `keep_second`, the next one); it takes the
   source's labels. With `label_gate` (default) a survivor beyond `tolerance` is rejected as
   label-inconsistent rather than kept;
4. no survivor among K: try again with new seeds and guidance one step lower, down to the floor
   (`schedule.guidance_at`); after `attempts` tries the source is skipped and counted.

Seeds, guidance and sources are pure functions of the config (`schedule`). Sources go in blocks
of `generate.block_size` (`blocks`); a block's batches depend only on the config, the seed and
the block, not on what ran before or how many processes share the work, so a resumed or sharded
run reproduces a single uninterrupted one byte for byte. Each finished block is saved
(atomically) before the next starts: a kill loses at most the block in progress. When every
block is done the main process publishes them (`publish`, the set through `release`):

    run/.work/generate/block-000012.npz   a finished block: accepted images and decisions
    run/generate/
        synthetic/            the releasable set: syn-000000.png, ... and labels.csv (path,
                              one column per label); no patient ID, no source path
        decisions.csv         PRIVATE, never exported: one row per candidate drawn (its source's
                              training row, seed, attempt, guidance, every score against its
                              threshold, divergence, outcome)
        generate.json         acceptance rate, rejections by reason, attempts per source,
                              NFE and seconds per accepted image

The stage (`stages.generate`) assembles a `Generation` from the run's published models.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from unpersonal.config import GenerateConfig, SamplingConfig
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError
from unpersonal.privacy.filter import CHECKS
from unpersonal.progress import LiveBar, console
from unpersonal.release import encode_set, image_names, write_files
from unpersonal.rundir import write_atomic
from unpersonal.sampling.blocks import (block_path, block_positions, finished_blocks, load_block,
                                        save_block)
from unpersonal.sampling.judge import CandidateJudge
from unpersonal.sampling.sampler import Sampler
from unpersonal.sampling.schedule import candidate_seed, drawn_from_source, guidance_at
from unpersonal.sampling.search import Block, Candidates, Draw, Requests, search_block

DECISION_FIELDS = ("position", "source_row", "attempt", "candidate", "seed", "guidance",
                   "reid_source_score", "drawn_from_source", "reid_threshold", "reid_score",
                   "reid_any_patient_threshold", "reid_nearest_row",
                   "embedding_distance", "embedding_floor", "pixel_distance", "pixel_floor",
                   "divergence", "strictly_rejected", "outcome")


def check_settings(settings: GenerateConfig) -> None:
    if settings.mode == "first" and settings.round_size > settings.candidates:
        raise UserError(f"generate.round_size ({settings.round_size}) is larger than "
                        f"generate.candidates ({settings.candidates})")


# ---------------------------------------------------------------------------------------------
# Drawing candidates


@dataclass(frozen=True)
class CandidateDrawer:
    """The `Draw` of `search`: each requested candidate from the sampler, with the seed and
    guidance weight `schedule` gives its (position, attempt, candidate)."""

    sampler: Sampler
    order: np.ndarray
    """The training row of each position."""
    seed: int
    settings: GenerateConfig

    def __call__(self, requests: Requests) -> Candidates:
        """Rows are grouped by attempt (one guidance weight each) and drawn in the sampler's
        batches, in the given order within a group."""
        rows = self.order[requests.positions]
        seeds = np.array([candidate_seed(self.seed, int(p), int(a), int(c)) for p, a, c in
                          zip(requests.positions, requests.attempts, requests.candidates)],
                         dtype=np.uint64)
        weights = np.array([self.guidance(int(a)) for a in requests.attempts])
        groups = [np.flatnonzero(requests.attempts == a) for a in np.unique(requests.attempts)]
        batches = [self.sampler.draw(rows[group], seeds[group], float(weights[group[0]]))
                   for group in groups]
        drawn = np.concatenate([batch.images for batch in batches])
        images = np.empty_like(drawn)
        images[np.concatenate(groups)] = drawn  # back in the requested order
        sampling, uses_pseudo = self.sampler.settings, self.sampler.conditioner.uses_pseudo
        from_source = np.array([drawn_from_source(uses_pseudo, sampling.guide, float(w),
                                                  self.settings.pseudo_condition)
                                for w in weights], dtype=bool)
        return Candidates(images, seeds, rows, weights, from_source,
                          sum(batch.evaluations for batch in batches))

    def guidance(self, attempt: int) -> float:
        return guidance_at(self.settings, self.sampler.settings, attempt,
                           self.sampler.conditioner.mode)


# ---------------------------------------------------------------------------------------------
# Blocks


@dataclass(frozen=True)
class Generation:
    """What every block of one run is generated from; `stages.generate` assembles it."""

    settings: GenerateConfig
    sampling: SamplingConfig
    train: CanonicalDataset
    """The training split: the sources, their labels."""
    train_images: np.ndarray
    """The training images, float in [0, 1]."""
    order: np.ndarray
    """The training row of each position."""
    draw: Draw
    judge: CandidateJudge
    conditioning: str
    """What the denoiser was trained to be told (`diffusion.conditioning`)."""
    model: dict[str, Any]
    """The denoiser's model.json: its latent space, its differential privacy, its starting point."""

    def block(self, positions: np.ndarray) -> Block:
        """Search the sources at `positions` (one block), timed."""
        started = time.perf_counter()
        judge = self.judge.for_sources(positions, self.train_images[self.order[positions]])
        block = search_block(positions, self.settings, self.draw, judge)
        return replace(block, seconds=time.perf_counter() - started)


def generate_blocks(generation: Generation, work: Path, blocks: list[int], show: bool) -> None:
    """Generate and save each of `blocks` not already saved in `work`, resuming after those."""
    size, n_sources = generation.settings.block_size, len(generation.order)
    done = finished_blocks(work, blocks)
    todo = [b for b in blocks if b not in done]
    sources_done = sum(len(block_positions(b, size, n_sources)) for b in done)
    total = sum(len(block_positions(b, size, n_sources)) for b in blocks)
    accepted = sum(int((load_block(block_path(work, b)).image_rank == 0).sum()) for b in done)
    if done:
        console.print(f"generate: resuming, {len(done)} of {len(blocks)} blocks already done")
    with LiveBar("generating", total, start=sources_done, log_every=size, enabled=show) as bar:
        for b in todo:
            positions = block_positions(b, size, n_sources)
            block = generation.block(positions)
            save_block(block_path(work, b), block)
            sources_done += len(positions)
            accepted += int((block.image_rank == 0).sum())
            candidates = len(block.decisions["outcome"])
            bar.update(len(positions), accepted=f"{accepted}/{sources_done}",
                       candidates_per_source=float(candidates / len(positions)))


# ---------------------------------------------------------------------------------------------
# Publishing


def publish(folder: Path, train: CanonicalDataset, blocks: list[Block], summary: dict[str, Any]
            ) -> None:
    """Write the synthetic set, the private decision log and the summary."""
    images = np.concatenate([b.images for b in blocks])
    labels = train.labels[np.concatenate([b.image_source_row for b in blocks])]
    write_files(folder / "synthetic", encode_set(images, labels, train.label_names).items())
    write_decisions(folder / "decisions.csv", blocks, image_names(len(images)))
    write_atomic(folder / "generate.json", json.dumps(summary, indent=2) + "\n")


def write_decisions(path: Path, blocks: list[Block], names: list[str]) -> None:
    """One row per candidate, in drawing order; an accepted one names its synthetic file."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow([*DECISION_FIELDS, "synthetic_file"])
    released = iter(names)
    for block in blocks:
        file_of = {int(row): next(released) for row in block.image_decision}
        columns = [block.decisions[name] for name in DECISION_FIELDS]
        for row, values in enumerate(zip(*columns)):
            writer.writerow([*(_cell(value) for value in values), file_of.get(row, "")])
    write_atomic(path, table.getvalue())


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value.item() if isinstance(value, np.generic) else value)


def label_group(labels: np.ndarray, kind: str, names: list[str]) -> str:
    """One image's labels as a readable key: the class name, or name=value for each column."""
    if kind == "multiclass":
        return names[int(np.argmax(labels))]
    return ", ".join(f"{name}={int(value)}" for name, value in zip(names, labels))


def label_mix(train: CanonicalDataset, order: np.ndarray, blocks: list[Block]
              ) -> dict[str, dict[str, int]]:
    """Sources and released images per label: the filter can turn away one class more than
    another (films that look alike are more alike across patients too), and a release whose
    class mix drifts from the training set's trains weaker classifiers."""

    def count(rows: np.ndarray) -> Counter:
        return Counter(label_group(train.labels[row], train.label_kind, train.label_names)
                       for row in rows)

    sources = count(order[np.concatenate([b.positions for b in blocks])])
    released = count(np.concatenate([b.image_source_row for b in blocks]))
    return {group: {"sources": sources[group], "released": released[group]}
            for group in sorted(sources)}


def summarise(generation: Generation, blocks: list[Block], processes: int, device: str
              ) -> dict[str, Any]:
    """The figures generate.json reports: how many came out, what it cost, why others did not."""
    outcomes = np.concatenate([b.decisions["outcome"] for b in blocks])
    strict = np.concatenate([b.decisions["strictly_rejected"] for b in blocks])
    accepted_first = sum(int((b.image_rank == 0).sum()) for b in blocks)
    sources = sum(len(b.positions) for b in blocks)
    images = sum(len(b.images) for b in blocks)
    evaluations = sum(b.evaluations for b in blocks)
    seconds = sum(b.seconds for b in blocks)
    reasons = Counter()
    for outcome in outcomes:
        if outcome.startswith("rejected:"):
            reasons.update(outcome.removeprefix("rejected:").split("+"))
    rejected = int(sum(o.startswith("rejected:") for o in outcomes))
    accepted_rows = np.char.startswith(outcomes.astype(str), "accepted")
    return {
        "sources": sources, "accepted_sources": accepted_first,
        "skipped_sources": int(sum(int(b.skipped.sum()) for b in blocks)),
        "images": images, "candidates": len(outcomes),
        "acceptance_rate": round(accepted_first / max(sources, 1), 4),
        "candidate_pass_rate": round(1 - rejected / max(len(outcomes), 1), 4),
        "rejections_by_reason": {check: int(reasons[check]) for check in (*CHECKS, "label")},
        "candidates_rejected": rejected,
        "attempts_per_source_mean": round(float(np.mean(np.concatenate(
            [b.attempts_used for b in blocks]))), 4),
        "candidates_per_source_mean": round(len(outcomes) / max(sources, 1), 4),
        "nfe_total": evaluations,
        "nfe_per_accepted": round(evaluations / max(images, 1), 2),
        "seconds_total": round(seconds, 2),
        "seconds_per_accepted": round(seconds / max(images, 1), 4),
        "accepted_strictly_rejected": int(strict[accepted_rows].sum()),
        "by_label": label_mix(generation.train, generation.order, blocks),
        "settings": _settings(generation),
        "processes": processes, "device": device,
    }


def _settings(generation: Generation) -> dict[str, Any]:
    """The choices behind the set, as generate.json and the datasheet show them."""
    settings, sampling = generation.settings, generation.sampling
    pair, anyone = generation.judge.reid_thresholds()
    first_weight = guidance_at(settings, sampling, 0, generation.conditioning)
    return {"mode": settings.mode, "candidates": settings.candidates,
            "round_size": settings.round_size, "tolerance": settings.tolerance,
            "label_gate": settings.label_gate,
            "selection": settings.selection, "attempts": settings.attempts,
            "solver": sampling.solver, "steps": sampling.steps,
            "guidance": first_weight, "guide": sampling.guide,
            "guidance_against": sampling.guidance_against,
            "guidance_step": settings.guidance_step,
            "guidance_floor": settings.guidance_floor,
            "reid_check": settings.reid_check, "reid_threshold": pair,
            "reid_any_patient_threshold": anyone,
            "distance_floors": settings.distance_floors,
            "pseudo_condition": settings.pseudo_condition,
            "pseudo_neighbours": settings.pseudo_neighbours,
            "generator": generator(generation.model),
            "differential_privacy": generation.model.get("privacy"),
            "pretrained_on": (generation.model.get("init") or {}).get("trained_on"),
            "drawn_from": drawn_from(generation.conditioning, sampling.guide,
                                     sampling.guidance_against, first_weight,
                                     settings.pseudo_condition)}


def generator(model: dict[str, Any]) -> str:
    """The generator in words, for generate.json and the datasheet (`model`: its model.json)."""
    latent, privacy, init = model.get("latent"), model.get("privacy"), model.get("init")
    words = "EDM-preconditioned diffusion model"
    if latent is None:
        words += " on the pixels"
    else:
        words += (f" in the {latent['channels']}-channel latent space ({latent['factor']}x "
                  "downsampled) of an autoencoder trained on the training split, each image "
                  "decoded before the filter judged it")
    if init is not None:
        words += f", started from a denoiser trained on {init['trained_on']}"
        if privacy is not None and not init.get("patients_checked"):
            words += " (taken to share no patient with these data: it could not be checked)"
    if privacy is not None:
        unit = privacy["unit"]
        words += (f", trained with differential privacy per {unit} (DP-SGD, epsilon = "
                  f"{privacy['epsilon']:.2f}, delta = {privacy['delta']:g}, accountant "
                  f"{privacy['accountant']}): whether or not any one training {unit} was in the "
                  "data changes the probability of any outcome of its training by at most a "
                  "factor e^epsilon, plus delta")
    return words


def drawn_from(conditioning: str, guide: str, against: str, first_weight: float,
               pseudo_condition: str) -> str:
    """What a candidate's first attempt is drawn from, in words, for generate.json and the
    datasheet: the datasheet must say the generator follows an image's embedding only when it
    does. Classifier-free guidance at w = 0 evaluates its null condition only: the labels alone
    for a model told the labels and guided against them, else nothing."""
    labels, pseudo = "class" in conditioning, "pseudo" in conditioning
    if guide == "cfg" and first_weight == 0:
        labels = labels and against == "labels"
    pseudo = drawn_from_source(pseudo, guide, first_weight)  # the pseudo part is followed
    told = (["its source's labels"] if labels else []) + (
        ["its source image's embedding" if pseudo_condition == "source" else
         "the mean embedding of its source's nearest training images of other patients with "
         "the same labels"] if pseudo else [])
    if not told:
        return "nothing: an unconditional sample"
    return " and ".join(told) + (" alone" if told == ["its source's labels"] else "")
