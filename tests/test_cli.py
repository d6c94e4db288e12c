"""The command line as a user meets it: help, exit codes, one-line errors, skipping, demo data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_flat_npz, write_image_folder

COMMANDS = ["prepare", "fit-diffusion", "sample", "demo-data", "config", "run"]
SMALL_DEMO = ("--set", "phantoms.n_patients=12", "--set", "data.resolution=16")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(cli, command: str) -> None:
    result = cli(command, "--help")
    assert result.code == 0 and "--out" in result.stdout


def test_version(cli) -> None:
    from unpersonal import __version__
    assert cli("--version").stdout.strip() == f"unpersonal {__version__}"


def _assert_refused(result, pattern: str, run: Path) -> None:
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], lines
    assert not run.exists(), "a refused run must leave no run directory"


def test_bad_input_exits_2_with_one_line_and_no_run_directory(cli, tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds")
    (folder / "img" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = tmp_path / "run"
    _assert_refused(cli("prepare", "--data", folder, "--out", run), "img/003.png (CSV line 5)", run)


def test_config_typo_exits_2(cli, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  resolutoin: 32\n")
    run = tmp_path / "run"
    _assert_refused(cli("prepare", "--config", config, "--out", run), "data.resolutoin", run)
    _assert_refused(cli("prepare", "--set", "phantoms.n_patient=3", "--out", run),
                    "phantoms.n_patient", run)


def test_missing_data_and_missing_out_are_named(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _assert_refused(cli("prepare", "--data", tmp_path / "nope.npz", "--out", run), "nope.npz", run)
    _assert_refused(cli("prepare", "--data", tmp_path), "--out is required", run)


def test_patient_in_two_splits_exits_2_naming_the_patient(cli, tmp_path: Path) -> None:
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    splits[5] = "val"  # P002's second image
    data = write_flat_npz(tmp_path / "d.npz", splits=splits)
    run = tmp_path / "run"
    _assert_refused(cli("prepare", "--data", data, "--out", run), "patient 'P002'", run)


def test_prepare_skips_when_unchanged_and_redoes_on_change_or_force(cli, tmp_path: Path) -> None:
    data = write_flat_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    first = cli("prepare", "--data", data, "--out", run, "--set", "data.resolution=16")
    assert first.code == 0 and "prepared 24 images at 16 px" in first.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    again = cli("prepare", "--out", run)  # the run's config.yaml is reused
    assert "up to date" in again.stderr
    assert json.loads((run / "manifest.json").read_text()) == manifest
    assert "up to date" not in cli("prepare", "--out", run, "--force").stderr
    changed = cli("prepare", "--out", run, "--set", "data.resolution=8")
    assert "up to date" not in changed.stderr and "at 8 px" in changed.stderr
    assert np.load(run / "prepare" / "arrays.npz")["images"].shape == (24, 8, 8)
    write_flat_npz(data, label=np.ones(24, dtype=int))  # the input itself changed
    assert "up to date" not in cli("prepare", "--out", run).stderr


def test_prepare_prints_the_summary(cli, tmp_path: Path) -> None:
    result = cli("prepare", "--out", tmp_path / "run", *SMALL_DEMO)
    assert result.code == 0
    for text in ("split", "images", "patients", "per patient", "2+ images", "finding",
                 "patients shared between splits: 0", "positive images per label"):
        assert text in result.stderr


def test_no_patient_ids_flag(cli, tmp_path: Path) -> None:
    data = tmp_path / "m.npz"
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8), np.uint8)
    np.savez(data, train_images=images[:4], train_labels=np.array([[0], [1]] * 2),
             val_images=images[4:5], val_labels=np.array([[0]]),
             test_images=images[5:], test_labels=np.array([[1]]))
    run = tmp_path / "run"
    _assert_refused(cli("prepare", "--data", data, "--out", run), "no patient ID", run)
    assert cli("prepare", "--data", data, "--out", run, "--no-patient-ids").code == 0


def test_config_command_shows_the_run_config(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cli("prepare", "--out", run, *SMALL_DEMO, "--set", "seed=5")
    shown = cli("config", "--out", run).stdout
    assert "resolution: 16" in shown and "seed: 5" in shown and "n_patients: 12" in shown


@pytest.mark.parametrize("layout", ["npz", "folder"])
def test_demo_data_files_prepare_like_the_builtin_phantoms(cli, tmp_path: Path, layout: str) -> None:
    target = tmp_path / ("demo.npz" if layout == "npz" else "demo")
    assert cli("demo-data", "--out", target, "--layout", layout, *SMALL_DEMO).code == 0
    assert target.exists() and not list(tmp_path.glob(".*partial*"))
    from_files = cli("prepare", "--data", target, "--out", tmp_path / "a", "--preset", "demo",
                     "--set", "data.resolution=16")
    builtin = cli("prepare", "--out", tmp_path / "b", *SMALL_DEMO)
    assert from_files.code == builtin.code == 0
    a = np.load(tmp_path / "a" / "prepare" / "arrays.npz")
    b = np.load(tmp_path / "b" / "prepare" / "arrays.npz")
    for key in ("images", "labels", "patient_id", "split"):
        assert np.array_equal(a[key], b[key]), key


def test_run_after_every_stage_skips_them_all(cli, released_run: Path, tmp_path: Path) -> None:
    """`run` finds the stages a user ran one by one, with the same config, up to date."""
    run = tmp_path / "run"
    shutil.copytree(released_run, run)
    again = cli("run", "--out", run)
    assert again.code == 0, again.stderr
    for stage in ("prepare", "fit-embedder", "fit-reid", "calibrate", "fit-classifier",
                  "fit-diffusion", "generate", "audit", "eval", "report", "export"):
        assert f"{stage}: up to date" in again.stderr, stage
    assert str(run / "export") in again.stderr


def test_evaluate_refuses_a_release_too_small_for_coverage(cli, released_run: Path,
                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(released_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = cli("evaluate", "--out", run, "--set", "evaluate.prdc_k=100000")
    assert result.code == 2, result.stderr
    assert "evaluate.prdc_k" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written


def test_switching_preset_on_an_existing_run_is_refused(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, *SMALL_DEMO).code == 0
    result = cli("prepare", "--out", run, "--preset", "gpu")
    assert result.code == 2 and "made with preset demo" in result.stderr
    assert cli("prepare", "--out", run, "--preset", "demo").code == 0


def test_a_command_on_a_run_another_command_holds_stops_and_names_it(cli, tmp_path: Path
                                                                      ) -> None:
    """Two commands on one run directory would write over each other: the second stops."""
    fcntl = pytest.importorskip("fcntl")
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli("prepare", "--out", run)
        assert result.code == 2
        assert f"{run} is in use by another unpersonal command (process 4242)" in result.stderr
        assert [path.name for path in run.iterdir()] == [".lock"]  # nothing written
    assert cli("prepare", "--out", run).code == 0  # released when its holder ends
