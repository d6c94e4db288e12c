"""`unpersonal generate` on a small phantom run: filtered set, memorisation, resume, sharding."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import copy_run_without, invoke_cli
from unpersonal.config import GenerateConfig, SamplingConfig, load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.models.conditioning import neighbour_conditions
from unpersonal.privacy.filter import FilterPolicy
from unpersonal.release import encode_set, export_files, read_names, read_pixels, write_files
from unpersonal.rundir import RunDir
from unpersonal.sampling.blocks import (block_count, block_positions, load_block, owned_blocks,
                                        save_block)
from unpersonal.sampling.generate import CandidateDrawer, drawn_from, label_group
from unpersonal.sampling.judge import label_divergence
from unpersonal.sampling.schedule import candidate_seed, drawn_from_source, guidance_at
from unpersonal.sampling.search import Candidates, Judgement, Requests, search_block
from unpersonal.stages import execute, stage, stage_key
from unpersonal.stages.calibrate import load_filter


def _set_bytes(run: Path) -> dict[str, bytes]:
    """Every file of the published set and the decision log, by name."""
    files = sorted((run / "generate" / "synthetic").iterdir())
    return {path.name: path.read_bytes() for path in files} | {
        "decisions.csv": (run / "generate" / "decisions.csv").read_bytes()}


def _accepted(run: Path) -> list[dict[str, str]]:
    """The decision rows of the released images, in the order of their files."""
    with open(run / "generate" / "decisions.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["outcome"].startswith("accepted")]
    return sorted(rows, key=lambda row: row["synthetic_file"])


def _synthetic_images(run: Path) -> tuple[np.ndarray, list[dict[str, str]]]:
    with open(run / "generate" / "synthetic" / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    images = np.stack([np.asarray(Image.open(run / "generate" / "synthetic" / row["path"]))
                       for row in rows])
    return images, rows


def test_every_released_image_passes_a_filter_rebuilt_from_scratch(generated_run: Path) -> None:
    summary = json.loads((generated_run / "generate" / "generate.json").read_text())
    images, rows = _synthetic_images(generated_run)
    assert summary["images"] == len(images) > 0
    assert summary["accepted_sources"] + summary["skipped_sources"] == summary["sources"]
    config = load_config(config_file=generated_run / "config.yaml")
    fresh = load_filter(config, RunDir(generated_run))
    unit = images.astype(np.float32) / 255
    accepted = _accepted(generated_run)
    assert [row["synthetic_file"] for row in accepted] == [row["path"] for row in rows]
    sources = np.array([int(row["source_row"]) for row in accepted])
    from_source = np.array([row["drawn_from_source"] == "True" for row in accepted])
    assert not fresh.check(unit, sources, drawn_from_source=from_source).rejected.any()
    assert not fresh.check(unit).rejected.any()  # against every training patient, no source
    # Each image takes its source's labels.
    train = load_canonical(generated_run / "prepare").subset("train")
    names = train.label_names
    labels = np.array([[int(row[name]) for name in names] for row in rows])
    assert np.array_equal(labels, train.labels[sources])
    # The steward sees how each label fared: sources and released images per label.
    released = Counter(label_group(row, train.label_kind, names) for row in labels)
    mix = summary["by_label"]
    assert {group: m["released"] for group, m in mix.items() if m["released"]} == released
    assert sum(m["sources"] for m in mix.values()) == summary["sources"]


def test_released_files_carry_no_patient_id_or_source_reference(generated_run: Path) -> None:
    dataset = load_canonical(generated_run / "prepare")
    secrets = {str(value).encode() for value in
               np.concatenate([np.unique(dataset.patient_id), dataset.ref])}
    folder = generated_run / "generate" / "synthetic"
    with open(folder / "labels.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["path", *dataset.label_names]
    for path in folder.iterdir():
        content = path.read_bytes()
        assert not [secret for secret in secrets if secret in content], path.name
        if path.suffix == ".png":
            assert not Image.open(path).text, f"{path.name} carries PNG text chunks"
    assert not list(folder.glob("*decisions*"))  # the private log stays outside the set


def test_a_memorising_sampler_gets_nothing_through(generated_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run_without(generated_run, tmp_path / "run")
    train = load_canonical(run / "prepare").subset("train")

    def memorise(self, requests: Requests) -> Candidates:  # the source image, +-1 grey level
        rows, count = self.order[requests.positions], len(requests)
        noise = np.random.default_rng(int(requests.positions.sum())).integers(-1, 2, (count, 16, 16))
        copies = np.clip(train.images[rows].astype(int) + noise, 0, 255).astype(np.uint8)
        return Candidates(copies, np.arange(count, dtype=np.uint64), rows, np.ones(count),
                          np.ones(count, dtype=bool), count)

    monkeypatch.setattr(CandidateDrawer, "__call__", memorise)
    assert execute(stage("generate"), load_config(config_file=run / "config.yaml"),
                   RunDir(run)).built
    summary = json.loads((run / "generate" / "generate.json").read_text())
    assert summary["images"] == 0 and summary["skipped_sources"] == summary["sources"]
    assert summary["candidates_rejected"] == summary["candidates"] > 0
    assert list((run / "generate" / "synthetic").iterdir()) == [run / "generate" / "synthetic" /
                                                                "labels.csv"]


def _unpersonal(*args: str | Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "unpersonal", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_and_resumed_equals_uninterrupted_byte_for_byte(generated_run: Path,
                                                               tmp_path: Path) -> None:
    run = copy_run_without(generated_run, tmp_path / "run")
    process = _unpersonal("generate", "--out", run)
    first_block = run / ".work" / "generate" / "block-000000.npz"
    deadline = time.monotonic() + 120
    while not first_block.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_block.exists() and not (run / "generate").exists(), "killed too late to test"
    resumed = _unpersonal("generate", "--out", run)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in err
    assert _set_bytes(run) == _set_bytes(generated_run)
    assert not (run / ".work").exists()


def test_two_processes_give_the_same_set_as_one(generated_run: Path, tmp_path: Path) -> None:
    run = copy_run_without(generated_run, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29600 + os.getpid() % 1000), "-m", "unpersonal", "generate", "--out", str(run)],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((run / "generate" / "generate.json").read_text())["processes"] == 2
    assert _set_bytes(run) == _set_bytes(generated_run)


def test_best_mode_draws_all_k_and_can_keep_the_second_best(generated_run: Path,
                                                           tmp_path: Path) -> None:
    run = copy_run_without(generated_run, tmp_path / "run")
    invoke_cli("generate", "--out", run, "--set", "generate.mode=best",
            "--set", "generate.candidates=3", "--set", "generate.keep_second=true",
            "--set", "generate.count=12")
    with open(run / "generate" / "decisions.csv", newline="") as handle:
        decisions = list(csv.DictReader(handle))
    per_attempt: dict[tuple[str, str], int] = {}
    for row in decisions:
        key = (row["position"], row["attempt"])
        per_attempt[key] = per_attempt.get(key, 0) + 1
    assert set(per_attempt.values()) == {3}  # every attempt drew all K
    summary = json.loads((run / "generate" / "generate.json").read_text())
    assert summary["sources"] == 12
    seconds = sum(row["outcome"] == "accepted:second" for row in decisions)
    assert summary["images"] == summary["accepted_sources"] + seconds > summary["accepted_sources"]


def test_neighbour_conditions_draw_other_images_checked_against_every_patient(
        generated_run: Path, tmp_path: Path) -> None:
    """generate.pseudo_condition=neighbours at w = 1: the model is told the neighbours' mean,
    so the candidates differ from those drawn from the source's own embedding with the same
    seeds, and none is held to the pair threshold against its source."""
    common = ("--set", "generate.guidance=1.0", "--set", "generate.guidance_floor=1.0",
              "--set", "generate.count=8", "--set", "generate.attempts=1")
    own = copy_run_without(generated_run, tmp_path / "own")
    invoke_cli("generate", "--out", own, *common)
    neighbours = copy_run_without(generated_run, tmp_path / "neighbours")
    invoke_cli("generate", "--out", neighbours, *common,
               "--set", "generate.pseudo_condition=neighbours")
    decisions = {}
    for name, run in (("own", own), ("neighbours", neighbours)):
        with open(run / "generate" / "decisions.csv", newline="") as handle:
            decisions[name] = list(csv.DictReader(handle))
    assert {row["drawn_from_source"] for row in decisions["own"]} == {"True"}
    assert {row["drawn_from_source"] for row in decisions["neighbours"]} == {"False"}
    said = {name: json.loads((run / "generate" / "generate.json").read_text())["settings"]
            ["drawn_from"] for name, run in (("own", own), ("neighbours", neighbours))}
    assert said["own"] == "its source's labels and its source image's embedding"
    assert "mean embedding of its source's nearest training images" in said["neighbours"]
    # The same seed draws another image: its score against the source differs.
    own_scores, neighbour_scores = ({row["seed"]: float(row["reid_source_score"])
                                     for row in decisions[name]} for name in decisions)
    both = own_scores.keys() & neighbour_scores.keys()
    assert len(both) >= 8
    assert all(own_scores[seed] != neighbour_scores[seed] for seed in both)


def test_every_released_image_looks_like_its_label(generated_run: Path) -> None:
    """The classifier's output on each released image is within `tolerance` of its source's."""
    tolerance = load_config(config_file=generated_run / "config.yaml").generate.tolerance
    accepted = _accepted(generated_run)
    assert accepted
    assert all(float(row["divergence"]) <= tolerance for row in accepted)
    summary = json.loads((generated_run / "generate" / "generate.json").read_text())
    assert summary["settings"]["label_gate"] is True
    assert "label" in summary["rejections_by_reason"]


def test_the_label_gate_rejects_what_the_reference_behaviour_keeps(generated_run: Path,
                                                                   tmp_path: Path) -> None:
    """With no divergence tolerated the gate lets nothing through; without the gate the least
    divergent survivor is kept whatever its divergence."""
    strict = ("--set", "generate.tolerance=0", "--set", "generate.count=6",
              "--set", "generate.candidates=2", "--set", "generate.attempts=1")
    gated = copy_run_without(generated_run, tmp_path / "gated")
    invoke_cli("generate", "--out", gated, *strict)
    summary = json.loads((gated / "generate" / "generate.json").read_text())
    assert summary["images"] == 0 and summary["skipped_sources"] == 6
    assert summary["rejections_by_reason"]["label"] > 0
    ungated = copy_run_without(generated_run, tmp_path / "ungated")
    invoke_cli("generate", "--out", ungated, *strict, "--set", "generate.label_gate=false")
    assert [float(row["divergence"]) > 0 for row in _accepted(ungated)] == [True] * len(
        _accepted(ungated)) != []


def test_the_reference_policy_misses_what_the_product_filter_catches(generated_run: Path) -> None:
    """A training image of another patient, offered as a candidate for source 0: the
    source-only check with a fixed 0.5 threshold and no floors lets it through."""
    run = RunDir(generated_run)
    config = load_config(config_file=generated_run / "config.yaml")
    privacy_filter = load_filter(config, run)
    train = load_canonical(generated_run / "prepare").subset("train")
    other = int(np.flatnonzero(train.patient_id != train.patient_id[0])[0])
    copy = train.images_float()[[other]]
    reference = FilterPolicy(reid_against="source", reid_threshold=0.5, distance_floors=False)
    result = privacy_filter.check(copy, np.array([0]), reference)
    assert result.strictly_rejected.all()  # the product's filter: a copy of a training image
    assert result.strict["pixel"].all() and result.reid_nearest[0] == other
    assert not result.flags["embedding"].any() and not result.flags["pixel"].any()


def test_label_divergence_is_zero_on_agreement_symmetric_and_grows_with_disagreement() -> None:
    p = np.array([[0.9], [0.5], [0.1]])
    q = np.array([[0.9], [0.7], [0.8]])
    for rule in ("symmetric-kl", "jensen-shannon", "total-variation"):
        d = label_divergence(p, q, "binary", rule)
        assert d[0] == pytest.approx(0, abs=1e-12) and 0 < d[1] < d[2], rule
        assert np.allclose(d, label_divergence(q, p, "binary", rule)), rule
    multiclass = np.array([[0.7, 0.2, 0.1]])
    assert label_divergence(multiclass, multiclass, "multiclass")[0] == pytest.approx(0, abs=1e-12)
    assert label_divergence(multiclass, multiclass[:, ::-1], "multiclass")[0] > 1
    # Multi-label: the tolerance is per label, whatever the number of labels.
    one = label_divergence(np.array([[0.9, 0.1]]), np.array([[0.1, 0.1]]), "multilabel")
    two = label_divergence(np.array([[0.9, 0.9]]), np.array([[0.1, 0.1]]), "multilabel")
    assert two[0] == pytest.approx(one[0]) and one[0] > 1
    eight = label_divergence(np.full((1, 8), 0.55), np.full((1, 8), 0.5), "multilabel")
    assert eight[0] == pytest.approx(label_divergence(np.array([[0.55]]), np.array([[0.5]]),
                                                      "binary")[0])


def test_guidance_steps_down_to_its_floor_and_seeds_are_pure() -> None:
    settings = GenerateConfig(guidance_step=0.5, guidance_floor=1.0)
    sampling = SamplingConfig(guidance=2.0)
    assert [guidance_at(settings, sampling, a, "class+pseudo") for a in range(4)] == [
        2.0, 1.5, 1.0, 1.0]
    own = settings.model_copy(update={"guidance": 0.5})
    assert guidance_at(own, sampling, 3, "class+pseudo") == 0.5  # the first weight, never raised
    # A model told the labels alone, guided against them, draws from the labels at any weight:
    # w = 0 must not turn into an unconditional sample.
    zero = settings.model_copy(update={"guidance": 0.0})
    assert [guidance_at(zero, sampling, a, "class") for a in range(3)] == [1.0, 1.0, 1.0]
    assert drawn_from("class", "cfg", "labels", guidance_at(zero, sampling, 0, "class"),
                      "source") == "its source's labels alone"
    assert drawn_from("class", "cfg", "labels", 0.0, "source") == "its source's labels alone"
    empty = sampling.model_copy(update={"guidance_against": "empty"})
    assert guidance_at(zero, empty, 0, "class") == 0.0
    assert drawn_from("class", "cfg", "empty", 0.0, "source").startswith("nothing")
    # Drawn from the source's image unless the model has no pseudo-condition or w = 0 leaves
    # classifier-free guidance with its null alone.
    assert drawn_from_source(True, "cfg", 0.5) and drawn_from_source(True, "autoguidance", 0.0)
    assert not drawn_from_source(True, "cfg", 0.0) and not drawn_from_source(False, "cfg", 2.0)
    # The mean of other patients' embeddings carries no source image: checked like the labels.
    assert not drawn_from_source(True, "cfg", 1.0, "neighbours")
    # What generate.json and the datasheet say each candidate is drawn from.
    assert drawn_from("class+pseudo", "cfg", "labels", 0.0, "source") == (
        "its source's labels alone")
    assert drawn_from("class+pseudo", "cfg", "empty", 0.0, "source").startswith("nothing")
    assert drawn_from("class+pseudo", "autoguidance", "labels", 0.0, "source").endswith(
        "its source image's embedding")
    seeds = {candidate_seed(0, p, a, c) for p in range(5) for a in range(3) for c in range(4)}
    assert len(seeds) == 60 and candidate_seed(0, 1, 2, 3) == candidate_seed(0, 1, 2, 3)


def test_neighbour_conditions_average_other_patients_with_the_same_labels() -> None:
    """Each row's condition is the unit mean of its k nearest rows of other patients with its
    labels: never its own patient's, never another label's; a row with none keeps its own."""
    rng = np.random.default_rng(0)
    pseudo = rng.normal(size=(7, 4)).astype(np.float32)
    pseudo[1] = pseudo[0] + 0.01  # row 0's twin, same patient: must not be used
    pseudo[2] = pseudo[0] + 0.1  # the nearest other patient with row 0's label
    pseudo[3] = pseudo[0] + 0.05  # nearer still, but another label
    patient = np.array(["a", "a", "b", "c", "d", "e", "f"])
    labels = np.array([[0], [0], [0], [1], [0], [0], [1]], np.uint8)
    unit = pseudo / np.linalg.norm(pseudo, axis=1, keepdims=True)
    out = neighbour_conditions(pseudo, patient, labels, k=1)
    np.testing.assert_allclose(out[0], unit[2], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(out[1], unit[0]) and not np.allclose(out[1], unit[1])
    # Rows 3 and 6 are the only label-1 rows: each is the other's one neighbour.
    np.testing.assert_allclose(out[3], unit[6], atol=1e-6)
    two = neighbour_conditions(pseudo, patient, labels, k=2)
    expected = unit[[2, 4, 5]][np.argsort(-(unit[[2, 4, 5]] @ unit[0]))[:2]].sum(axis=0)
    np.testing.assert_allclose(two[0], expected / np.linalg.norm(expected), atol=1e-6)
    alone = neighbour_conditions(pseudo[:2], patient[:2], labels[:2], k=3)
    np.testing.assert_allclose(alone, unit[:2], atol=1e-6)


def test_sampling_from_the_model_leaves_the_release_up_to_date(generated_run: Path,
                                                               tmp_path: Path) -> None:
    """`unpersonal sample --set ...` keeps its overrides in the run's config; the count and the
    batch size it sets do not change generate's images, so they must not make generate stale."""
    run = Path(shutil.copytree(generated_run, tmp_path / "run"))

    def generate_is_fresh() -> bool:
        config = load_config(config_file=run / "config.yaml")
        return RunDir(run).is_fresh("generate", stage_key(stage("generate"), config, RunDir(run)))

    assert generate_is_fresh()
    invoke_cli("sample", "--out", run, "--set", "sampling.count=3",
               "--set", "sampling.batch_size=2")
    assert (run / "sample" / "images.npz").is_file()
    assert generate_is_fresh()
    invoke_cli("sample", "--out", run, "--set", "sampling.steps=3")
    assert not generate_is_fresh()  # the solver's steps do change every candidate


def test_the_batch_size_changes_neither_the_samples_nor_their_freshness(generated_run: Path,
                                                                         tmp_path: Path) -> None:
    """A user who lowers `sampling.batch_size` to fit memory gets the same images, and the
    sample stage they already drew is not redone for it."""
    run = Path(shutil.copytree(generated_run, tmp_path / "run"))
    invoke_cli("sample", "--out", run, "--set", "sampling.count=5", "--set",
               "sampling.batch_size=5")
    with np.load(run / "sample" / "images.npz") as drawn:
        in_one_batch = drawn["images"].copy()

    def sample_record() -> dict:
        return json.loads((run / "manifest.json").read_text())["stages"]["sample"]

    drawn_once = sample_record()
    invoke_cli("sample", "--out", run, "--set", "sampling.batch_size=2")
    assert sample_record() == drawn_once  # up to date: not drawn again
    invoke_cli("sample", "--out", run, "--force", "--set", "sampling.batch_size=2")
    assert load_config(config_file=run / "config.yaml").sampling.batch_size == 2
    with np.load(run / "sample" / "images.npz") as drawn:
        np.testing.assert_array_equal(drawn["images"], in_one_batch)


# ---------------------------------------------------------------------------------------------
# The search, without any model: scripted draws and verdicts


def _scripted(verdicts: dict[tuple[int, int, int], tuple[str, float]]):
    """A draw whose image n shows (position, attempt, candidate), and a judge that gives each
    the (privacy reasons, divergence) scripted for it (default: passes, divergence 0.1)."""

    def draw(requests: Requests) -> Candidates:
        count = len(requests)
        images = np.stack([np.array([[p, a, c]], np.uint8) for p, a, c in
                           zip(requests.positions, requests.attempts, requests.candidates)])
        return Candidates(images, np.arange(count, dtype=np.uint64), requests.positions + 100,
                          np.ones(count), np.ones(count, dtype=bool), 7 * count)

    def judge(requests: Requests, candidates: Candidates) -> Judgement:
        keys = zip(requests.positions.tolist(), requests.attempts.tolist(),
                   requests.candidates.tolist())
        reasons, divergence = zip(*(verdicts.get(key, ("", 0.1)) for key in keys))
        return Judgement(list(reasons), np.array(divergence),
                         {"reid_score": np.full(len(requests), 0.25)})

    return draw, judge


def _rows(block) -> list[tuple[int, int, int, str]]:
    decisions = block.decisions
    return list(zip(decisions["position"].tolist(), decisions["attempt"].tolist(),
                    decisions["candidate"].tolist(), decisions["outcome"].tolist()))


def test_first_mode_keeps_the_first_label_consistent_survivor_and_logs_each_row_once() -> None:
    settings = GenerateConfig(candidates=3, round_size=1, tolerance=0.5)
    draw, judge = _scripted({(0, 0, 0): ("reid", 0.1), (1, 0, 0): ("", 0.9),
                             (1, 0, 1): ("pixel+reid", 0.1)})
    block = search_block(np.array([0, 1, 2]), settings, draw, judge)
    assert _rows(block) == [  # round by round, each source still searching in every round
        (0, 0, 0, "rejected:reid"), (1, 0, 0, "rejected:label"), (2, 0, 0, "accepted"),
        (0, 0, 1, "accepted"), (1, 0, 1, "rejected:pixel+reid"),
        (1, 0, 2, "accepted")]
    assert block.image_position.tolist() == [0, 1, 2] and block.image_rank.tolist() == [0, 0, 0]
    assert block.image_decision.tolist() == [3, 5, 2]
    assert block.images[:, 0].tolist() == [[0, 0, 1], [1, 0, 2], [2, 0, 0]]
    assert block.image_source_row.tolist() == [100, 101, 102]
    assert block.attempts_used.tolist() == [1, 1, 1] and not block.skipped.any()
    assert block.evaluations == 7 * 6 and block.decisions["reid_score"].tolist() == [0.25] * 6


def test_without_the_label_gate_the_least_divergent_survivor_of_an_attempt_is_kept() -> None:
    """Its row was logged rounds before the attempt ended; its outcome says accepted all the
    same, and the later survivor stays a survivor."""
    settings = GenerateConfig(candidates=2, round_size=1, tolerance=0.0, label_gate=False)
    draw, judge = _scripted({(0, 0, 0): ("", 0.3), (0, 0, 1): ("", 0.6)})
    block = search_block(np.array([0]), settings, draw, judge)
    assert _rows(block) == [(0, 0, 0, "accepted"), (0, 0, 1, "survivor")]
    assert block.image_decision.tolist() == [0]


def test_a_source_without_survivors_tries_again_then_is_skipped() -> None:
    settings = GenerateConfig(candidates=2, round_size=2, attempts=2)
    draw, judge = _scripted({(5, a, c): ("reid", 0.1) for a in range(2) for c in range(2)})
    block = search_block(np.array([5, 6]), settings, draw, judge)
    assert _rows(block) == [(5, 0, 0, "rejected:reid"), (5, 0, 1, "rejected:reid"),
                            (6, 0, 0, "accepted"), (6, 0, 1, "survivor"),
                            (5, 1, 0, "rejected:reid"), (5, 1, 1, "rejected:reid")]
    assert block.skipped.tolist() == [True, False] and block.attempts_used.tolist() == [2, 1]
    assert block.image_position.tolist() == [6]


def test_best_mode_draws_all_k_at_once_and_keeps_the_two_best_in_order() -> None:
    settings = GenerateConfig(candidates=3, mode="best", keep_second=True)
    draw, judge = _scripted({(0, 0, 0): ("", 0.3), (0, 0, 1): ("", 0.2), (0, 0, 2): ("", 0.4),
                             (1, 0, 0): ("embedding", 0.0), (1, 0, 1): ("", 0.2)})
    block = search_block(np.array([0, 1]), settings, draw, judge)
    assert [outcome for *_, outcome in _rows(block)] == [
        "accepted:second", "accepted", "survivor", "rejected:embedding", "accepted:second",
        "accepted"]
    assert block.image_position.tolist() == [0, 0, 1, 1]
    assert block.image_rank.tolist() == [0, 1, 0, 1]
    assert block.image_decision.tolist() == [1, 0, 5, 4]  # by position, best first


def test_a_block_survives_saving_and_every_block_has_one_owner(tmp_path: Path) -> None:
    draw, judge = _scripted({(3, 0, 0): ("reid", 0.1)})
    block = search_block(block_positions(1, 3, 5), GenerateConfig(), draw, judge)
    save_block(tmp_path / "block.npz", block)
    loaded = load_block(tmp_path / "block.npz")
    assert loaded.evaluations == block.evaluations and loaded.seconds == block.seconds
    for name in ("positions", "images", "image_decision", "attempts_used", "skipped"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(block, name))
    assert {name: values.tolist() for name, values in loaded.decisions.items()} == {
        name: values.tolist() for name, values in block.decisions.items()}
    n_blocks = block_count(70, 8)
    owned = [owned_blocks(n_blocks, rank, 3) for rank in range(3)]
    assert n_blocks == 9 and sorted(sum(owned, [])) == list(range(9))


def test_the_release_format_reads_back_what_it_wrote(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 65536, (3, 4, 4)).astype(np.uint16)
    labels = np.array([[1, 0], [0, 1], [1, 1]], np.uint8)
    write_files(tmp_path / "set", encode_set(images, labels, ["a", "b"]).items())
    names = read_names(tmp_path / "set")
    assert names == ["syn-000000.png", "syn-000001.png", "syn-000002.png"]
    np.testing.assert_array_equal(np.stack(list(read_pixels(tmp_path / "set", names))), images)
    assert (tmp_path / "set" / "labels.csv").read_bytes() == (
        b"path,a,b\nsyn-000000.png,1,0\nsyn-000001.png,0,1\nsyn-000002.png,1,1\n")
    exported = export_files(tmp_path / "set", names[::-1])  # the order of the names it is given
    assert list(exported) == [f"images/{name}" for name in names[::-1]] + ["metadata.csv"]
    assert exported["images/syn-000001.png"] == (tmp_path / "set" / names[1]).read_bytes()
    assert exported["metadata.csv"] == (b"file_name,a,b\nimages/syn-000002.png,1,1\n"
                                        b"images/syn-000001.png,0,1\nimages/syn-000000.png,1,0\n")
