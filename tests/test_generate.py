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
from unpersonal.config import GenerateConfig, load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.privacy.filter import FilterPolicy, PrivacyFilter
from unpersonal.rundir import RunDir
from unpersonal.sampling import generate as generate_module
from unpersonal.sampling.generate import (candidate_seed, guidance_at, label_divergence,
                                          label_group, run_generate)


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
    fresh = PrivacyFilter.load(RunDir(generated_run), config)
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

    def memorise(self, positions, attempts, candidates):  # the source image, +-1 grey level
        noise = np.random.default_rng(int(positions.sum())).integers(-1, 2, (len(positions), 16, 16))
        copies = np.clip(train.images[self.order[positions]].astype(int) + noise, 0, 255)
        return copies.astype(np.uint8), np.arange(len(positions), dtype=np.uint64), len(positions)

    monkeypatch.setattr(generate_module.Generator, "draw", memorise)
    assert run_generate(load_config(config_file=run / "config.yaml"), RunDir(run))
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
    privacy_filter = PrivacyFilter.load(run, config)
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
    # Multi-label: each label's disagreement adds up.
    one = label_divergence(np.array([[0.9, 0.1]]), np.array([[0.1, 0.1]]), "multilabel")
    two = label_divergence(np.array([[0.9, 0.9]]), np.array([[0.1, 0.1]]), "multilabel")
    assert two[0] == pytest.approx(2 * one[0])


def test_guidance_steps_down_to_its_floor_and_seeds_are_pure() -> None:
    settings = GenerateConfig(guidance_step=0.5, guidance_floor=1.0)
    assert [guidance_at(settings, 2.0, a) for a in range(4)] == [2.0, 1.5, 1.0, 1.0]
    assert guidance_at(settings, 0.5, 3) == 0.5  # never raised to the floor
    seeds = {candidate_seed(0, p, a, c) for p in range(5) for a in range(3) for c in range(4)}
    assert len(seeds) == 60 and candidate_seed(0, 1, 2, 3) == candidate_seed(0, 1, 2, 3)


def test_sampling_from_the_model_leaves_the_release_up_to_date(generated_run: Path,
                                                               tmp_path: Path) -> None:
    """`unpersonal sample --set ...` keeps its overrides in the run's config; the count and the
    batch size it sets do not change generate's images, so they must not make generate stale."""
    run = Path(shutil.copytree(generated_run, tmp_path / "run"))

    def generate_is_fresh() -> bool:
        config = load_config(config_file=run / "config.yaml")
        return RunDir(run).is_fresh("generate", generate_module.stage_key(config, RunDir(run)))

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
