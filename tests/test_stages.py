"""The stage registry is the one place a stage is declared: the CLI and `run` follow it."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GENERATE_STAGES
from unpersonal import stages
from unpersonal.config import Config
from unpersonal.stages import Stage, StageTask, commands, downstream_of, pipeline


def test_cli_commands_are_the_registry_commands() -> None:
    from unpersonal.cli import app

    declared = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert declared == {*commands(), "run", "config", "demo-data"}
    assert [s.name for s in commands()["audit"]] == ["audit-embedder", "audit-reid", "audit"]
    assert [s.name for s in commands()["evaluate"]] == ["audit-embedder", "audit-reid", "eval"]
    assert "sample" not in [s.name for s in pipeline()]
    assert GENERATE_STAGES == tuple(s.name for s in pipeline(Config()))[:len(GENERATE_STAGES)]


def test_run_makes_the_autoencoder_only_in_latent_space() -> None:
    pixel, latent = Config(), Config(diffusion={"space": "latent"})
    assert "fit-autoencoder" not in [s.name for s in pipeline(pixel)]
    chain = [s.name for s in pipeline(latent)]
    assert chain.index("fit-autoencoder") < chain.index("fit-diffusion")
    fit_diffusion = stages.stage("fit-diffusion")
    assert stages.reads(fit_diffusion, pixel) == ("prepare",)
    assert stages.reads(fit_diffusion, latent) == ("prepare", "fit-autoencoder")
    assert "fit-diffusion" in downstream_of("fit-autoencoder")


def test_every_stage_reads_only_stages_declared_before_it() -> None:
    seen: set[str] = set()
    for entry in stages.STAGES:
        assert {*entry.reads, *entry.reads_if_present, *entry.reads_if_needed} <= seen, entry.name
        seen.add(entry.name)
    assert downstream_of("generate") == ["audit", "eval", "report", "export"]


def build_toy(task: StageTask) -> dict[str, Any]:
    """A stage added through the registry alone: counts the prepared images per split."""
    meta = json.loads((task.input("prepare") / "dataset.json").read_text())
    counts = {split: row["images"] for split, row in meta["summary"]["splits"].items()}
    with task.output() as folder:
        (folder / "counts.json").write_text(json.dumps(counts))
    return counts


TOY = Stage("toy", "toy", "Count the prepared images per split.", build=f"{__name__}:build_toy",
            reads=("prepare",), sections=("data",), summary_file="counts.json",
            line=lambda counts, folder: [f"toy counted {sum(counts.values())} images"])


@pytest.fixture
def registry_with_toy(monkeypatch: pytest.MonkeyPatch):
    """The CLI rebuilt from a registry with the toy stage at the end."""
    import unpersonal.cli

    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, TOY))
    yield importlib.reload(unpersonal.cli).app
    monkeypatch.undo()
    importlib.reload(unpersonal.cli)


def test_a_stage_added_to_the_registry_is_a_command_and_part_of_run(
        registry_with_toy, cli, released_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(released_run, tmp_path / "run"))
    result = cli("run", "--out", run)
    assert result.code == 0, result.stderr
    said = [line.split(":")[0] for line in result.stderr.splitlines() if ": up to date in" in line]
    assert said == [s.name for s in pipeline(Config())[:-1]]  # every stage before the toy
    assert "toy counted" in result.stderr
    assert json.loads((run / "toy" / "counts.json").read_text())["train"] > 0
    assert json.loads((run / "manifest.json").read_text())["stages"]["toy"]["outputs"]

    again = cli("toy", "--out", run)
    assert again.code == 0 and "toy: up to date" in again.stderr
    assert "toy counted" in again.stderr  # its figures, from its summary file


def test_a_command_checks_every_input_before_it_builds_anything(
        registry_with_toy, cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cli("toy", "--out", run)
    assert result.code == 2
    assert "no finished 'prepare' stage; run `unpersonal prepare" in result.stderr
    assert not run.exists()
