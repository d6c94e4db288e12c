import json
from pathlib import Path

import pytest

from unpersonal.config import load_config
from unpersonal.rundir import RunDir, write_atomic


def _build(run: RunDir, key: str, text: str) -> None:
    with run.build_stage("stage", key, load_config()) as folder:
        (folder / "out.txt").write_text(text)


def test_published_stage_is_fresh_until_key_or_output_changes(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    _build(run, "k1", "hello")
    assert run.is_fresh("stage", "k1")
    assert not run.is_fresh("stage", "k2")
    assert (tmp_path / "run" / "config.yaml").is_file()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(manifest["stages"]["stage"]["outputs"]) == {"out.txt"}
    (tmp_path / "run" / "stage" / "out.txt").write_text("edited")
    assert not run.is_fresh("stage", "k1")


def test_manifest_keeps_the_seconds_from_start_to_publishing(tmp_path: Path) -> None:
    """Benchmarks read each stage's own time from the manifest, whenever it ran."""
    import time

    run = RunDir(tmp_path / "run")
    started = time.monotonic()
    time.sleep(0.2)
    with run.build_stage("stage", "k1", load_config(), started) as folder:
        (folder / "out.txt").write_text("hello")
    seconds = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["stage"][
        "seconds"]
    assert 0.2 <= seconds < 5


def test_failed_first_stage_leaves_no_run_directory(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with run.build_stage("stage", "k", load_config()) as folder:
            (folder / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "run").exists()


def test_failed_rebuild_keeps_the_previous_output(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    _build(run, "k1", "first")
    with pytest.raises(KeyboardInterrupt):
        with run.build_stage("stage", "k2", load_config()) as folder:
            (folder / "out.txt").write_text("second, unfinished")
            raise KeyboardInterrupt
    assert (tmp_path / "run" / "stage" / "out.txt").read_text() == "first"
    assert run.is_fresh("stage", "k1")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "manifest.json",
                                                                     "stage"]


def test_rebuild_replaces_the_whole_folder(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with run.build_stage("stage", "k1", load_config()) as folder:
        (folder / "stale.txt").write_text("old")
    _build(run, "k2", "new")
    assert sorted(p.name for p in (tmp_path / "run" / "stage").iterdir()) == ["out.txt"]


def test_write_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.json"
    write_atomic(target, "{}")
    write_atomic(target, b"[]")
    assert target.read_text() == "[]"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
