"""The `unpersonal` command: one subcommand per pipeline stage, plus `run` for all of them.

Every stage command takes the same run options (`--out`, `--preset`, `--config`, `--set`,
`--force`). On an existing run directory its `config.yaml` is the starting point, so redoing one
stage uses the config the run was made with unless the command line changes it.

Errors the user can fix print one line and exit with code 2; nothing half-written is left.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from unpersonal import __version__
from unpersonal.config import Config, load_config
from unpersonal.errors import Interrupted, UserError
from unpersonal.progress import console
from unpersonal.rundir import RunDir
from unpersonal.stages import Stage, check_inputs, commands, execute, outcome_lines, pipeline
from unpersonal.training.common import install_sigterm_as_interrupt

app = typer.Typer(
    name="unpersonal",
    help="Turn a patient-labelled medical image dataset into a synthetic one that singles out "
         "no patient. Without --data every command uses the built-in phantom demo data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_RUN = Path("runs/demo")

OutOption = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="run directory (default runs/demo for the demo data)")]
DataOption = Annotated[Optional[Path], typer.Option(
    "--data", "-d", help="dataset: .npz, image folder or CSV, DICOM or NIfTI folder; none = demo "
    "phantoms")]
PresetOption = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="demo, cpu, cpu-128 or gpu (default: demo without --data, cpu with "
    "it); cpu-128 is latent diffusion at 128 px, gpu at 256 px (not yet run end to end)")]
ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML config file (default: the run directory's config.yaml)")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="override one config field, e.g. --set data.resolution=32 (repeatable)")]
ForceOption = Annotated[bool, typer.Option("--force", help="redo the stage even if up to date")]
NoPatientIdsOption = Annotated[bool, typer.Option(
    "--no-patient-ids", help="the data has no patient IDs: count each image as its own patient")]
CsvOption = Annotated[Optional[Path], typer.Option(
    "--csv", help="label CSV of an image/DICOM/NIfTI folder (default: the only *.csv in it)")]
ReleaseOption = Annotated[Optional[Path], typer.Option(
    "--release", help="audit this folder of images (with an optional labels.csv) instead of the "
    "run's released set: any generator's output, against the run's private data")]
InitOption = Annotated[Optional[Path], typer.Option(
    "--init", help="start from another run's denoiser (a run folder, or a folder with model.json "
    "and ema.safetensors), e.g. one trained on public data: the same as --set diffusion.init=RUN")]
ToOption = Annotated[Optional[Path], typer.Option(
    "--to", help="where --release's audit is written (default: RUN/audit-release/FOLDER_NAME)")]


def resolve_run(out: Path | None, data: Path | None, preset: str | None,
                config_file: Path | None, overrides: list[str] | None,
                no_patient_ids: bool = False, csv: Path | None = None) -> tuple[Config, RunDir]:
    """The config and run directory a stage command works on."""
    if out is None:
        if data is not None:
            raise UserError("--out is required with --data: name the run directory, "
                            "e.g. --out runs/my_release")
        out = DEMO_RUN
    check_run_directory(out)
    saved = out / "config.yaml"
    if config_file is None and saved.is_file():
        config_file = saved
        made_with = load_config(None, saved).preset
        if preset is not None and preset != made_with:
            raise UserError(f"--preset {preset}: {out} was made with preset {made_with}; use a new "
                            "--out for another preset, or change single fields with --set")
    extra = list(overrides or [])
    if no_patient_ids:
        extra.append("data.no_patient_ids=true")
    if csv is not None:
        extra.append(f"data.csv={csv.expanduser().resolve()}")
    config = load_config(preset, config_file, extra, data_source=data)
    return config, RunDir(out)


def check_run_directory(out: Path) -> None:
    """Refuse, before anything is read or written, a --out that cannot hold a run."""
    if str(out) in ("", ".") or out.expanduser().resolve() == Path.cwd().resolve():
        if not (out / "config.yaml").is_file():
            raise UserError("--out names the working folder: name a folder for the run (e.g. "
                            "--out runs/my_release), not the working folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a run directory")
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable")


def _stage_command(command: str, chain: list[Stage]) -> None:
    """Declare `unpersonal COMMAND`, which brings the stages of `chain` up to date in order.

    The options that say how to read a dataset (--no-patient-ids, --csv) belong to the commands
    whose chain reads one."""

    def run_chain(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
                  config: ConfigOption = None, set_: SetOption = None,
                  force: ForceOption = False, no_patient_ids: NoPatientIdsOption = False,
                  csv: CsvOption = None) -> None:
        resolved, run_dir = resolve_run(out, data, preset, config, set_, no_patient_ids, csv)
        run_stages(chain, resolved, run_dir, chain[-1:] if force else [])

    def run_chain_on_a_run(out: OutOption = None, data: DataOption = None,
                           preset: PresetOption = None, config: ConfigOption = None,
                           set_: SetOption = None, force: ForceOption = False) -> None:
        run_chain(out, data, preset, config, set_, force)

    def run_chain_or_audit_a_folder(out: OutOption = None, preset: PresetOption = None,
                                    config: ConfigOption = None, set_: SetOption = None,
                                    force: ForceOption = False, release: ReleaseOption = None,
                                    to: ToOption = None) -> None:
        if release is None:
            if to is not None:
                raise UserError("--to is where the audit of --release goes: give --release too")
            run_chain(out, None, preset, config, set_, force)
            return
        resolved, run_dir = resolve_run(out, None, preset, config, set_)
        audit_folder(chain, resolved, run_dir, release, to)

    def run_chain_from_weights(out: OutOption = None, data: DataOption = None,
                               preset: PresetOption = None, config: ConfigOption = None,
                               set_: SetOption = None, force: ForceOption = False,
                               no_patient_ids: NoPatientIdsOption = False, csv: CsvOption = None,
                               init: InitOption = None) -> None:
        extra = [*(set_ or []), *([f"diffusion.init={init}"] if init is not None else [])]
        run_chain(out, data, preset, config, extra, force, no_patient_ids, csv)

    reads_data = any("data_format" in entry.extra_options for entry in chain)
    audits_folders = "release" in chain[-1].extra_options
    declared = (run_chain_from_weights if "init" in chain[-1].extra_options else
                run_chain if reads_data else
                run_chain_or_audit_a_folder if audits_folders else run_chain_on_a_run)
    declared.__doc__ = chain[-1].help
    app.command(command)(declared)


def run_stages(chain: list[Stage], config: Config, run: RunDir, redo: list[Stage]) -> None:
    """Check every input the chain does not make itself, then bring each stage up to date;
    those in `redo` are made again even when up to date (`--force`: a command's own stage, not
    the audit's models it builds first; `run --force`: every stage)."""
    check_inputs(chain, config, run)
    install_sigterm_as_interrupt()
    with run.in_use():
        for entry in chain:
            outcome = execute(entry, config, run, entry in redo)
            for line in outcome_lines(outcome, run):
                console.print(line, soft_wrap=True)


def audit_folder(chain: list[Stage], config: Config, run: RunDir, release: Path,
                 to: Path | None) -> None:
    """`audit --release DIR`: read and check the folder, bring the audit's models (the chain
    before its last stage) up to date, audit the folder and print its table."""
    from unpersonal.stages.audit import audit_release, read_release
    from unpersonal.stages.lines import privacy_table

    released = read_release(config, run, release)
    for note in released.notes:
        console.print(f"note: {note}")
    run_stages(chain[:-1], config, run, [])
    out = to if to is not None else run.root / "audit-release" / release.resolve().name
    figures = audit_release(config, run, released, release, out)
    console.print(privacy_table(figures))
    console.print(f"-> {out / 'AUDIT.md'}")


for _command, _chain in commands().items():
    _stage_command(_command, _chain)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="file (.npz) or folder to write")] = Path(
        "demo_data.npz"),
    layout: Annotated[str, typer.Option(help="npz (one file) or folder (PNGs + labels.csv)")] = "npz",
    preset: PresetOption = None, config: ConfigOption = None, set_: SetOption = None,
) -> None:
    """Write the procedural phantom chest X-rays (known patients, a binary finding) as files.

    The phantoms are what `prepare` uses without --data; written out, they show the input
    formats unpersonal reads.
    """
    from unpersonal.data.demo import write_demo_data

    if layout not in ("npz", "folder"):
        raise UserError(f"--layout {layout!r}: choose npz or folder")
    resolved = load_config(preset, config, set_ or [])
    console.print(write_demo_data(resolved.phantoms, resolved.data.resolution, resolved.seed, out,
                                  layout))


@app.command("config")
def show_config(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
                config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (YAML) a command with these options would use."""
    resolved, _ = resolve_run(out, data, preset, config, set_)
    sys.stdout.write(resolved.to_yaml())


@app.command()
def run(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
        config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
        no_patient_ids: NoPatientIdsOption = False, csv: CsvOption = None) -> None:
    """Run every stage in order, skipping those already up to date; rerun to resume."""
    resolved, run_dir = resolve_run(out, data, preset, config, set_, no_patient_ids, csv)
    chain = pipeline(resolved)
    run_stages(chain, resolved, run_dir, chain if force else [])
    report = run_dir.stage_path("report") / "index.html"
    console.print(f"report (internal, shows real images): {report}")
    console.print(f"release (shareable): {run_dir.stage_path('export')}")


run.__doc__ = (run.__doc__ or "") + "\n\n" + ", ".join(entry.name for entry in pipeline()) + "."


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"unpersonal {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Turn a patient-labelled medical image dataset into a shareable synthetic one."""


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except Interrupted as stop:
        sys.stderr.write(f"interrupted: {stop}\n")
        raise SystemExit(stop.exit_code) from None
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(error.exit_code) from None
