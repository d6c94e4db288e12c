"""Bad input at the run directory and the command line, tried as a new user would: one line
naming the file or option, exit code 2, and the output folder as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, assert_refused


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its content, to show a refusal changed nothing."""
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with `prepare` alone (seconds)."""
    from tests.conftest import invoke_cli

    run = tmp_path_factory.mktemp("prepared") / "run"
    invoke_cli("prepare", "--out", run, *TINY)
    return run


@pytest.mark.parametrize("command", ["audit", "evaluate"])
def test_audit_and_evaluate_without_generate_refuse_before_training_anything(
        cli, prepared: Path, command: str) -> None:
    before = _tree(prepared)
    assert_refused(cli(command, "--out", prepared), "no finished 'generate' stage",
             f"`unpersonal generate --out {prepared}`")
    assert _tree(prepared) == before
    assert not (prepared / "audit-embedder").exists() and not (prepared / ".work").exists()


@pytest.mark.parametrize("content", ["[]", "null", '{"format": 1}', '{"format": 1, "stages": []}',
                                     '{"format": 1, "stages": {"prepare": 3}}', "{not json"])
def test_a_damaged_manifest_is_named_and_force_does_not_promise_a_fix(
        cli, prepared: Path, tmp_path: Path, content: str) -> None:
    import shutil

    run = Path(shutil.copytree(prepared, tmp_path / "run"))
    (run / "manifest.json").write_text(content)
    before = _tree(run)
    for force in ([], ["--force"]):
        line = assert_refused(cli("fit-embedder", "--out", run, *force), str(run / "manifest.json"),
                        "damaged")
        assert "--force" not in line
    assert _tree(run) == before


def test_out_that_is_a_file_or_under_a_file_isassert_refused(cli, tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    assert_refused(cli("prepare", "--out", afile, *TINY), f"--out {afile}", "is a file")
    assert_refused(cli("prepare", "--out", afile / "run", *TINY), f"{afile} is a file")
    assert afile.read_text() == "keep me" and list(tmp_path.iterdir()) == [afile]


def test_out_empty_or_the_working_folder_isassert_refused(cli, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_refused(cli("prepare", "--out", "", *TINY), "--out", "not the working folder")
    assert_refused(cli("prepare", "--out", ".", *TINY), "not the working folder")
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_may_be_the_working_folder(cli, prepared: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(prepared)
    assert cli("prepare", "--out", ".").code == 0


def test_out_that_is_not_writable_isassert_refused(cli, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: (Path(path) != locked
                                                          and real_access(path, mode)))
    assert_refused(cli("prepare", "--out", locked / "run", *TINY), f"{locked} is not writable")
    assert list(locked.iterdir()) == []


def test_a_damaged_manifest_record_names_the_file(cli, prepared: Path, tmp_path: Path) -> None:
    import shutil

    run = Path(shutil.copytree(prepared, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["stages"]["prepare"]["outputs"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(cli("prepare", "--out", run), "manifest.json is damaged")
