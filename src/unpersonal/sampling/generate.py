"""`unpersonal generate`: diversity-aware synthetic images that no privacy check links to a patient.

For each source (a training image; every one once by default, in a seeded order):

1. draw candidates conditioned on the source's pseudo-condition (its embedding) and its labels,
   with the fast solver, the EMA weights and guidance w. `best` draws all K at once; `first`
   draws `round_size` at a time and stops at the first round with a survivor whose labels agree
   within `tolerance`, so the common case costs one round;
2. run the privacy filter on each candidate (`privacy.filter`): re-ID against its nearest
   training images of every patient and the source (and against the source alone with the pair
   threshold, when the candidate was drawn from the source's embedding: at guidance w = 0
   against the labels, the cpu preset's, it is drawn from the labels alone), then the embedding
   and pixel distance floors;
3. keep the survivor whose classifier output diverges least from the source's (and, with
   `keep_second`, the next one); it takes the source's labels. With `label_gate` (default) a
   survivor beyond `tolerance` is rejected as label-inconsistent rather than kept;
4. no survivor among K: try again with new seeds and guidance one step lower, down to the floor;
   after `attempts` tries the source is skipped and counted.

Sources go in blocks of `generate.block_size`. A block's batches depend only on the config, the
seed and the block, not on what ran before or how many processes share the work, so a resumed
or sharded run reproduces a single uninterrupted one byte for byte. Each finished block is
saved (atomically) before the next starts: a kill loses at most the block in progress.

    run/.work/generate/block-000012.npz   a finished block: accepted images and decisions
    run/generate/                         published when every block is done:
        synthetic/            the releasable set: syn-000000.png, ... and labels.csv (path,
                              one column per label); no patient ID, no source path
        decisions.csv         PRIVATE, never exported: one row per candidate drawn (its source's
                              training row, seed, attempt, guidance, every score against its
                              threshold, divergence, outcome)
        generate.json         acceptance rate, rejections by reason, attempts per source,
                              NFE and seconds per accepted image
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unpersonal.config import Config, GenerateConfig
from unpersonal.data.canonical import CanonicalDataset, load_canonical
from unpersonal.errors import UserError
from unpersonal.models.conditioning import Conditioner, label_code
from unpersonal.models.edm import Denoiser
from unpersonal.privacy.filter import CHECKS, FilterPolicy, PrivacyFilter
from unpersonal.progress import LiveBar, console
from unpersonal.rundir import RunDir, sha256_json, write_atomic, write_npz_atomic
from unpersonal.sampling.draw import SPEED_ONLY, source_indices, to_stored
from unpersonal.sampling.solvers import sample
from unpersonal.training.classifier import Classifier, load_classifier
from unpersonal.training.diffusion import load_denoiser

STAGE = "generate"
UPSTREAM = ("prepare", "fit-embedder", "fit-reid", "calibrate", "fit-classifier", "fit-diffusion")
PROBABILITY_CLIP = 1e-6
DECISION_FIELDS = ("position", "source_row", "attempt", "candidate", "seed", "guidance",
                   "reid_source_score", "drawn_from_source", "reid_threshold", "reid_score",
                   "reid_any_patient_threshold", "reid_nearest_row",
                   "embedding_distance", "embedding_floor", "pixel_distance", "pixel_floor",
                   "divergence", "strictly_rejected", "outcome")


# ---------------------------------------------------------------------------------------------
# Label consistency


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
    is surer than its source the same as one that contradicts it. Summed over labels. [N]
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
    return per_group.sum(axis=1)


# ---------------------------------------------------------------------------------------------
# Seeds and guidance: pure functions of the config, so any process can recompute them


def candidate_seed(seed: int, position: int, attempt: int, candidate: int) -> int:
    """Noise seed of candidate c of attempt a for the source at `position` of the order."""
    return int(np.random.SeedSequence([seed, 3, position, attempt, candidate]).generate_state(1)[0])


def guidance_at(settings: GenerateConfig, guidance: float, attempt: int) -> float:
    """The guidance weight of attempt a: lowered by a step per failed attempt, never below the
    floor (nor raised to it when the configured weight is already lower)."""
    floor = min(guidance, settings.guidance_floor)
    return max(floor, guidance - attempt * settings.guidance_step)


def first_guidance(config: Config) -> float:
    """The first attempt's guidance weight: generate's own, else the sampling section's."""
    own = config.generate.guidance
    return config.sampling.guidance if own is None else own


def block_count(n_sources: int, block_size: int) -> int:
    return -(-n_sources // block_size)


# ---------------------------------------------------------------------------------------------
# What a block needs, loaded once per process


@dataclass
class Generator:
    """The trained models and the data a block is generated from."""

    config: Config
    denoiser: Denoiser
    guide: Denoiser | None
    conditioner: Conditioner
    codes: torch.Tensor  # label codes of the training images [N, L]
    pseudo: torch.Tensor  # pseudo-conditions of the training images [N, D]
    train: CanonicalDataset
    train_float: np.ndarray  # [N, R, R] in [0, 1]
    privacy_filter: PrivacyFilter
    classifier: Classifier
    policy: FilterPolicy
    order: np.ndarray  # training row of each position
    device: torch.device

    @classmethod
    def load(cls, config: Config, run: RunDir, device: torch.device) -> Generator:
        dataset = load_canonical(run.stage_path("prepare"))
        train = dataset.subset("train")
        model_folder = run.stage_path("fit-diffusion")
        denoiser, meta = load_denoiser(model_folder)
        guide = None
        if config.sampling.guide == "autoguidance" and first_guidance(config) != 1:
            guide, _ = load_denoiser(model_folder, "guide")
            guide.to(device)
        conditioner = Conditioner(**meta["conditioner"])
        if meta["resolution"] != train.resolution:
            raise UserError(f"{model_folder} was trained at {meta['resolution']} px but the "
                            f"prepared data is {train.resolution} px; rerun fit-diffusion")
        pseudo = (torch.from_numpy(np.load(model_folder / "pseudo_features.npy"))
                  if conditioner.uses_pseudo else torch.zeros(len(train), 0))
        count = config.generate.count or len(train)
        return cls(config, denoiser.to(device), guide, conditioner,
                   torch.from_numpy(label_code(train.labels, train.label_kind)), pseudo, train,
                   train.images_float(), PrivacyFilter.load(run, config),
                   load_classifier(run.stage_path("fit-classifier")),
                   FilterPolicy.from_config(config),
                   source_indices(config.seed, count, len(train)), device)

    def draw(self, positions: np.ndarray, attempts: np.ndarray, candidates: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, int]:
        """Sample one candidate per (position, attempt, candidate) row, in the given order.

        Rows are grouped by guidance weight (one per attempt) and sampled in batches of
        `sampling.batch_size`. Returns the images at the data's bit depth, their seeds and the
        network evaluations spent.
        """
        settings = self.config.sampling
        rows = self.order[positions]
        seeds = np.array([candidate_seed(self.config.seed, int(p), int(a), int(c))
                          for p, a, c in zip(positions, attempts, candidates)], dtype=np.uint64)
        images = np.empty((len(rows), self.train.resolution, self.train.resolution),
                          self.train.images.dtype)
        evaluations = 0
        shape = (1, self.train.resolution, self.train.resolution)
        for attempt in np.unique(attempts):
            weight = guidance_at(self.config.generate, first_guidance(self.config), int(attempt))
            chosen = np.flatnonzero(attempts == attempt)
            for start in range(0, len(chosen), settings.batch_size):
                batch = chosen[start:start + settings.batch_size]
                cond = self.conditioner.build(self.codes[rows[batch]], self.pseudo[rows[batch]])
                result = sample(self.denoiser, cond, [int(s) for s in seeds[batch]],
                                solver=settings.solver, num_steps=settings.steps,
                                guidance=weight, guide=self.guide, image_shape=shape,
                                sigma_min=settings.sigma_min, sigma_max=settings.sigma_max,
                                rho=settings.rho, device=self.device,
                                null=self.null_condition(rows[batch]))
                images[batch] = to_stored(result.images, self.train.bit_depth)
                evaluations += result.nfe_per_sample * len(batch)
        return images, seeds, evaluations

    def drawn_from_source(self, attempts: np.ndarray) -> np.ndarray:
        """Whether the candidates of these attempts were conditioned on their source's image:
        a model told the pseudo-condition, guided with a weight that keeps it (w = 0 against
        the labels keeps the labels alone, against the empty condition nothing)."""
        if not self.conditioner.uses_pseudo:
            return np.zeros(len(attempts), dtype=bool)
        if self.config.sampling.guide == "autoguidance":
            return np.ones(len(attempts), dtype=bool)  # both networks see the full condition
        weights = np.array([guidance_at(self.config.generate, first_guidance(self.config),
                                        int(a)) for a in attempts])
        return weights != 0

    def null_condition(self, rows: np.ndarray) -> torch.Tensor | None:
        """What guidance pushes away from: None (the empty condition) or the labels alone."""
        return self.conditioner.null(self.codes[rows], self.pseudo[rows],
                                     self.config.sampling.guidance_against)

    def to_float(self, images: np.ndarray) -> np.ndarray:
        return images.astype(np.float32) / float((1 << self.train.bit_depth) - 1)


# ---------------------------------------------------------------------------------------------
# One block


@dataclass
class _SourceState:
    attempt: int = 0
    drawn: int = 0  # candidates drawn in the current attempt
    survivors: list[tuple[float, int, int]] | None = None  # (divergence, candidate, decision row)
    done: bool = False
    skipped: bool = False


def generate_block(gen: Generator, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Generate for the sources at `positions`; returns the block's arrays (see `save_block`)."""
    settings = gen.config.generate
    started = time.perf_counter()
    state = [_SourceState(survivors=[]) for _ in positions]
    source_rows = gen.order[positions]
    source_probs = gen.classifier.predict_proba(gen.train_float[source_rows])
    decisions: list[dict[str, Any]] = []
    images_by_row: list[np.ndarray] = []
    kept: list[tuple[int, int, int]] = []  # (local source, rank, decision row)
    evaluations = 0
    while not all(s.done for s in state):
        job_source, job_attempt, job_candidate = [], [], []
        for i, s in enumerate(state):
            if s.done:
                continue
            left = settings.candidates - s.drawn
            take = left if settings.mode == "best" else min(settings.round_size, left)
            job_source += [i] * take
            job_attempt += [s.attempt] * take
            job_candidate += range(s.drawn, s.drawn + take)
        local = np.array(job_source)
        images, seeds, spent = gen.draw(positions[local], np.array(job_attempt),
                                        np.array(job_candidate))
        evaluations += spent
        from_source = gen.drawn_from_source(np.array(job_attempt))
        checked = gen.privacy_filter.check(gen.to_float(images), source_rows[local], gen.policy,
                                           from_source)
        divergence = label_divergence(gen.classifier.predict_proba(gen.to_float(images)),
                                      source_probs[local], gen.train.label_kind,
                                      settings.selection)
        first_row = len(decisions)
        for j, i in enumerate(local):
            decisions.append(_decision(gen, checked, j, int(positions[i]), int(source_rows[i]),
                                       job_attempt[j], job_candidate[j], int(seeds[j]),
                                       float(divergence[j]), bool(from_source[j])))
            images_by_row.append(images[j])
            if checked.rejected[j]:
                continue
            if settings.label_gate and divergence[j] > settings.tolerance:
                # It would carry a label the classifier does not see in it: label noise that
                # costs the release its utility (a quarter of the accepted images on Kermany
                # before this check).
                decisions[-1]["outcome"] = "rejected:label"
                continue
            state[i].survivors.append((float(divergence[j]), job_candidate[j], first_row + j))
        for i in np.unique(local):
            drawn_now = int((local == i).sum())
            _advance(state[i], drawn_now, settings, i, decisions, kept)
    return _block_arrays(gen, positions, state, decisions, images_by_row, kept, evaluations,
                         time.perf_counter() - started)


def _decision(gen: Generator, checked: Any, j: int, position: int, source_row: int,
              attempt: int, candidate: int, seed: int, divergence: float,
              drawn_from_source: bool) -> dict[str, Any]:
    floors = gen.privacy_filter.floors
    threshold = gen.policy.reid_threshold
    reason = checked.reason(j)
    return {"position": position, "source_row": source_row, "attempt": attempt,
            "candidate": candidate, "seed": seed,
            "guidance": guidance_at(gen.config.generate, first_guidance(gen.config), attempt),
            "reid_score": float(checked.reid_score[j]),
            "reid_source_score": float(checked.reid_source_score[j]),
            "drawn_from_source": drawn_from_source,
            "reid_threshold": gen.privacy_filter.reid.threshold if threshold is None else threshold,
            "reid_any_patient_threshold": (gen.privacy_filter.any_patient_threshold
                                           if threshold is None else threshold),
            "reid_nearest_row": int(checked.reid_nearest[j]),
            "embedding_distance": float(checked.embedding_distance[j]),
            "embedding_floor": floors["embedding"].value,
            "pixel_distance": float(checked.pixel_distance[j]),
            "pixel_floor": floors["pixel"].value, "divergence": divergence,
            "strictly_rejected": bool(checked.strictly_rejected[j]),
            "outcome": f"rejected:{reason}" if reason else "survivor"}


def _advance(s: _SourceState, drawn_now: int, settings: GenerateConfig, i: int,
             decisions: list[dict[str, Any]], kept: list[tuple[int, int, int]]) -> None:
    """After a round: keep the best survivor(s) and stop, or go on, or start a new attempt."""
    s.drawn += drawn_now
    ranked = sorted(s.survivors)  # smallest divergence first, then the earlier candidate
    good_enough = settings.mode == "first" and ranked and ranked[0][0] <= settings.tolerance
    if good_enough or (s.drawn >= settings.candidates and ranked):
        for rank, (_, _, row) in enumerate(ranked[: 2 if settings.keep_second else 1]):
            kept.append((i, rank, row))
            decisions[row]["outcome"] = "accepted" if rank == 0 else "accepted:second"
        s.done = True
    elif s.drawn >= settings.candidates:
        s.attempt, s.drawn, s.survivors = s.attempt + 1, 0, []
        if s.attempt >= settings.attempts:
            s.done = s.skipped = True


def _block_arrays(gen: Generator, positions: np.ndarray, state: list[_SourceState],
                  decisions: list[dict[str, Any]], images_by_row: list[np.ndarray],
                  kept: list[tuple[int, int, int]], evaluations: int, seconds: float
                  ) -> dict[str, np.ndarray]:
    kept.sort(key=lambda item: (int(positions[item[0]]), item[1]))
    rows = [row for _, _, row in kept]
    resolution = gen.train.resolution
    arrays: dict[str, np.ndarray] = {
        "images": (np.stack([images_by_row[row] for row in rows]) if rows else
                   np.zeros((0, resolution, resolution), gen.train.images.dtype)),
        "image_position": np.array([int(positions[i]) for i, _, _ in kept], np.int64),
        "image_rank": np.array([rank for _, rank, _ in kept], np.int64),
        "image_source_row": np.array([int(gen.order[positions[i]]) for i, _, _ in kept], np.int64),
        "image_decision": np.array(rows, np.int64),  # its row in the block's decisions
        "positions": positions.astype(np.int64),
        "attempts_used": np.array([s.attempt + (0 if s.skipped else 1) for s in state], np.int64),
        "skipped": np.array([s.skipped for s in state]),
        "evaluations": np.array(evaluations, np.int64),
        "seconds": np.array(seconds, np.float64),
    }
    for name in DECISION_FIELDS:
        arrays[f"decision_{name}"] = np.array([d[name] for d in decisions])
    return arrays


# ---------------------------------------------------------------------------------------------
# The stage


# `sampling.count` is `unpersonal sample`'s, and the batch size changes how fast, not what:
# every candidate has its own seed (tests/test_solvers.py). Neither may make generate stale, or
# a look at the model with `unpersonal sample --set sampling.count=...` would redo the release.
NOT_IN_GENERATE_KEY = ("count", *SPEED_ONLY)


def stage_key(config: Config, run: RunDir) -> str:
    inputs = {stage: run.require(stage) for stage in UPSTREAM}
    settings = config.section_dump(("sampling", "generate", "privacy"))
    settings["sampling"] = {name: value for name, value in settings["sampling"].items()
                            if name not in NOT_IN_GENERATE_KEY}
    return sha256_json({"config": settings, "inputs": inputs})


def run_generate(config: Config, run: RunDir, force: bool = False) -> bool:
    """Generate every block this process owns, then (main process) publish. False if skipped."""
    from accelerate import Accelerator

    _check_settings(config.generate)
    key = stage_key(config, run)
    if run.up_to_date(STAGE, key, force):
        return False
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:  # one process clears or keys the shared folder
        run.resumable_work_dir(STAGE, key, force)
    accelerator.wait_for_everyone()
    work = run.root / ".work" / STAGE
    gen = Generator.load(config, run, accelerator.device)
    n_blocks = block_count(len(gen.order), config.generate.block_size)
    mine = [b for b in range(n_blocks) if b % accelerator.num_processes ==
            accelerator.process_index]
    _generate_blocks(gen, work, mine, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        blocks = [load_block(block_path(work, b)) for b in range(n_blocks)]
        with run.build_stage(STAGE, key, config) as folder:
            publish(folder, gen, blocks, accelerator.num_processes)
        run.clear_work(STAGE)
    accelerator.wait_for_everyone()
    return True


def _check_settings(settings: GenerateConfig) -> None:
    if settings.mode == "first" and settings.round_size > settings.candidates:
        raise UserError(f"generate.round_size ({settings.round_size}) is larger than "
                        f"generate.candidates ({settings.candidates})")


def _generate_blocks(gen: Generator, work: Path, blocks: list[int], show: bool) -> None:
    size, n_sources = gen.config.generate.block_size, len(gen.order)
    done = [b for b in blocks if block_path(work, b).is_file()]
    todo = [b for b in blocks if b not in done]
    sources_done = sum(len(_positions(b, size, n_sources)) for b in done)
    total = sum(len(_positions(b, size, n_sources)) for b in blocks)
    accepted = sum(int((load_block(block_path(work, b))["image_rank"] == 0).sum()) for b in done)
    if done:
        console.print(f"generate: resuming, {len(done)} of {len(blocks)} blocks already done")
    with LiveBar("generating", total, start=sources_done, log_every=size, enabled=show) as bar:
        for b in todo:
            positions = _positions(b, size, n_sources)
            arrays = generate_block(gen, positions)
            save_block(block_path(work, b), arrays)
            sources_done += len(positions)
            accepted += int((arrays["image_rank"] == 0).sum())
            candidates = len(arrays["decision_outcome"])
            bar.update(len(positions), accepted=f"{accepted}/{sources_done}",
                       candidates_per_source=float(candidates / len(positions)))


def _positions(block: int, size: int, n_sources: int) -> np.ndarray:
    return np.arange(block * size, min((block + 1) * size, n_sources), dtype=np.int64)


def block_path(work: Path, block: int) -> Path:
    return work / f"block-{block:06d}.npz"


def save_block(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_npz_atomic(path, **arrays)


def load_block(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def publish(folder: Path, gen: Generator, blocks: list[dict[str, np.ndarray]],
            processes: int) -> None:
    """Write the synthetic set, the private decision log and the summary."""
    images = np.concatenate([b["images"] for b in blocks])
    source_rows = np.concatenate([b["image_source_row"] for b in blocks])
    labels = gen.train.labels[source_rows]
    names = synthetic_names(len(images))
    write_synthetic_set(folder / "synthetic", names, images, labels, gen.train.label_names)
    write_decisions(folder / "decisions.csv", blocks, names)
    summary = summarise(gen, blocks, processes)
    write_atomic(folder / "generate.json", json.dumps(summary, indent=2) + "\n")


def synthetic_names(count: int) -> list[str]:
    return [f"syn-{n:06d}.png" for n in range(count)]


def write_synthetic_set(folder: Path, names: list[str], images: np.ndarray, labels: np.ndarray,
                        label_names: list[str]) -> None:
    """PNGs at the data's bit depth plus labels.csv; nothing that points back at a patient."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, pixels in zip(names, images):
        write_atomic(folder / name, png_bytes(pixels))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", *label_names])
    for name, row in zip(names, labels):
        writer.writerow([name, *(int(value) for value in row)])
    write_atomic(folder / "labels.csv", table.getvalue())


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grey PNG, 8-bit for uint8 and 16-bit for uint16 pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_decisions(path: Path, blocks: list[dict[str, np.ndarray]], names: list[str]) -> None:
    """One row per candidate, in drawing order; an accepted one names its synthetic file."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow([*DECISION_FIELDS, "synthetic_file"])
    released = iter(names)
    for block in blocks:
        file_of = {int(row): next(released) for row in block["image_decision"]}
        columns = [block[f"decision_{name}"] for name in DECISION_FIELDS]
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


def label_mix(gen: Generator, blocks: list[dict[str, np.ndarray]]) -> dict[str, dict[str, int]]:
    """Sources and released images per label: the filter can turn away one class more than
    another (films that look alike are more alike across patients too), and a release whose
    class mix drifts from the training set's trains weaker classifiers."""
    train = gen.train

    def count(rows: np.ndarray) -> Counter:
        return Counter(label_group(train.labels[row], train.label_kind, train.label_names)
                       for row in rows)

    sources = count(gen.order[np.concatenate([b["positions"] for b in blocks])])
    released = count(np.concatenate([b["image_source_row"] for b in blocks]))
    return {group: {"sources": sources[group], "released": released[group]}
            for group in sorted(sources)}


def summarise(gen: Generator, blocks: list[dict[str, np.ndarray]], processes: int
              ) -> dict[str, Any]:
    """The figures generate.json reports: how many came out, what it cost, why others did not."""
    outcomes = np.concatenate([b["decision_outcome"] for b in blocks])
    strict = np.concatenate([b["decision_strictly_rejected"] for b in blocks])
    accepted_first = sum(int((b["image_rank"] == 0).sum()) for b in blocks)
    sources = sum(len(b["positions"]) for b in blocks)
    images = sum(len(b["images"]) for b in blocks)
    evaluations = sum(int(b["evaluations"]) for b in blocks)
    seconds = sum(float(b["seconds"]) for b in blocks)
    reasons = Counter()
    for outcome in outcomes:
        if outcome.startswith("rejected:"):
            reasons.update(outcome.removeprefix("rejected:").split("+"))
    rejected = int(sum(o.startswith("rejected:") for o in outcomes))
    settings, sampling = gen.config.generate, gen.config.sampling
    accepted_rows = np.char.startswith(outcomes.astype(str), "accepted")
    return {
        "sources": sources, "accepted_sources": accepted_first,
        "skipped_sources": int(sum(int(b["skipped"].sum()) for b in blocks)),
        "images": images, "candidates": len(outcomes),
        "acceptance_rate": round(accepted_first / max(sources, 1), 4),
        "candidate_pass_rate": round(1 - rejected / max(len(outcomes), 1), 4),
        "rejections_by_reason": {check: int(reasons[check]) for check in (*CHECKS, "label")},
        "candidates_rejected": rejected,
        "attempts_per_source_mean": round(float(np.mean(np.concatenate(
            [b["attempts_used"] for b in blocks]))), 4),
        "candidates_per_source_mean": round(len(outcomes) / max(sources, 1), 4),
        "nfe_total": evaluations,
        "nfe_per_accepted": round(evaluations / max(images, 1), 2),
        "seconds_total": round(seconds, 2),
        "seconds_per_accepted": round(seconds / max(images, 1), 4),
        "accepted_strictly_rejected": int(strict[accepted_rows].sum()),
        "by_label": label_mix(gen, blocks),
        "settings": {"mode": settings.mode, "candidates": settings.candidates,
                     "round_size": settings.round_size, "tolerance": settings.tolerance,
                     "label_gate": settings.label_gate,
                     "selection": settings.selection, "attempts": settings.attempts,
                     "solver": sampling.solver, "steps": sampling.steps,
                     "guidance": first_guidance(gen.config), "guide": sampling.guide,
                     "guidance_against": sampling.guidance_against,
                     "guidance_step": settings.guidance_step,
                     "guidance_floor": settings.guidance_floor,
                     "reid_check": settings.reid_check, "reid_threshold": (
                         settings.reid_threshold if settings.reid_threshold is not None
                         else gen.privacy_filter.reid.threshold),
                     "reid_any_patient_threshold": (
                         settings.reid_threshold if settings.reid_threshold is not None
                         else gen.privacy_filter.any_patient_threshold),
                     "distance_floors": settings.distance_floors},
        "processes": processes, "device": gen.device.type,
    }
