"""The `unpersonal` command: one subcommand per pipeline stage, plus `run` for all of them.

Every stage command takes the same run options (`--out`, `--preset`, `--config`, `--set`,
`--force`). On an existing run directory its `config.yaml` is the starting point, so redoing one
stage uses the config the run was made with unless the command line changes it.

Errors the user can fix print one line and exit with code 2; nothing half-written is left.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from unpersonal import __version__
from unpersonal.config import Config, load_config
from unpersonal.errors import Interrupted, UserError
from unpersonal.progress import console, note, warn
from unpersonal.rundir import RunDir

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
    "--preset", "-p", help="demo, cpu or gpu (default: demo without --data, cpu with it)")]
ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML config file (default: the run directory's config.yaml)")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="override one config field, e.g. --set data.resolution=32 (repeatable)")]
ForceOption = Annotated[bool, typer.Option("--force", help="redo the stage even if up to date")]
NoPatientIdsOption = Annotated[bool, typer.Option(
    "--no-patient-ids", help="the data has no patient IDs: count each image as its own patient")]
CsvOption = Annotated[Optional[Path], typer.Option(
    "--csv", help="label CSV of an image/DICOM/NIfTI folder (default: the only *.csv in it)")]


def resolve_run(out: Path | None, data: Path | None, preset: str | None,
                config_file: Path | None, overrides: list[str] | None,
                no_patient_ids: bool = False, csv: Path | None = None) -> tuple[Config, RunDir]:
    """The config and run directory a stage command works on."""
    if out is None:
        if data is not None:
            raise UserError("--out is required with --data: name the run directory, "
                            "e.g. --out runs/my_release")
        out = DEMO_RUN
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


@app.command()
def prepare(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
            config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
            no_patient_ids: NoPatientIdsOption = False, csv: CsvOption = None) -> None:
    """Read a dataset into the run directory's canonical form, with a patient-level split.

    Refuses a patient in two splits, images without patient IDs, the same image in two splits,
    unreadable files and non-finite pixels, naming the file or row.
    """
    resolved, run = resolve_run(out, data, preset, config, set_, no_patient_ids, csv)
    _prepare(resolved, run, force)


def _prepare(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.data.prepare import run_prepare

    result = run_prepare(config, run, force)
    data = result.data
    if result.skipped:
        _up_to_date(run, "prepare")
    for message in data.meta.get("notes", []):
        note(message)
    for message in data.meta.get("warnings", []):
        warn(message)
    for table in summary_tables(data.meta["summary"], data.label_names):
        console.print(table)
    console.print(f"prepared {len(data)} images at {data.resolution} px, "
                  f"{data.bit_depth}-bit, {data.label_kind} labels -> {run.stage_path('prepare')}",
                  soft_wrap=True)


def _up_to_date(run: RunDir, stage: str) -> None:
    console.print(f"{stage}: up to date in {run.stage_path(stage)} (--force redoes it)",
                  soft_wrap=True)


def summary_tables(summary: dict, label_names: list[str]) -> tuple[Table, Table]:
    """What a steward checks before anything is trained: patients per split, label balance."""
    splits = summary["splits"]
    people = Table(title="prepared dataset", title_justify="left",
                   caption=f"patients shared between splits: {summary['shared_patients']}")
    for column in ("split", "images", "patients", "per patient", "max", "2+ images"):
        people.add_column(column, justify="left" if column == "split" else "right")
    for split, row in splits.items():
        people.add_row(split, f"{row['images']:,}", f"{row['patients']:,}",
                       f"{row['images_per_patient_mean']:.2f}",
                       str(row["images_per_patient_max"]), f"{row['patients_with_2plus_images']:,}")
    balance = Table(title="positive images per label", title_justify="left")
    balance.add_column("label")
    for split in splits:
        balance.add_column(split, justify="right")
    for name in label_names:
        cells = [f"{row['positives'][name]:,} ({100 * row['positives'][name] / max(row['images'], 1):.0f}%)"
                 for row in splits.values()]
        balance.add_row(name, *cells)
    return people, balance


@app.command("fit-diffusion")
def fit_diffusion(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
                  config: ConfigOption = None, set_: SetOption = None,
                  force: ForceOption = False) -> None:
    """Train the diffusion model on the training split; Ctrl-C saves, rerunning resumes.

    Runs on the CPU, one GPU, or many processes with `accelerate launch -m unpersonal ...`.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _fit_diffusion(resolved, run_dir, force)


def _fit_diffusion(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.training.common import install_sigterm_as_interrupt
    from unpersonal.training.diffusion import STAGE, run_fit_diffusion

    install_sigterm_as_interrupt()
    if not run_fit_diffusion(config, run, force):
        _up_to_date(run, STAGE)
        return
    meta = json.loads((run.stage_path(STAGE) / "model.json").read_text())
    console.print(f"trained {meta['parameters']:,}-parameter denoiser for {meta['steps_done']} "
                  f"steps in {meta['seconds']:.0f} s -> {run.stage_path(STAGE)}", soft_wrap=True)


@app.command("sample")
def sample_images(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
                  config: ConfigOption = None, set_: SetOption = None,
                  force: ForceOption = False) -> None:
    """Draw unfiltered images from the trained model, with a real-vs-synthetic grid to look at.

    Solver, steps, guidance and count come from the sampling section, e.g.
    --set sampling.solver=heun --set sampling.steps=32. Nothing drawn here is filtered or
    exportable.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _sample(resolved, run_dir, force)


def _sample(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.sampling.draw import STAGE, run_sample

    folder = run.stage_path(STAGE)
    if not run_sample(config, run, force):
        _up_to_date(run, STAGE)
        return
    report = json.loads((folder / "sampling.json").read_text())
    console.print(f"sampled {report['count']} images with {report['solver']}, "
                  f"{report['nfe_per_image']} NFE each, {report['images_per_s']:.2f} images/s "
                  f"-> {folder / 'grid.png'}", soft_wrap=True)


@app.command("fit-embedder")
def fit_embedder(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
                 config: ConfigOption = None, set_: SetOption = None,
                 force: ForceOption = False) -> None:
    """Train the self-supervised embedder on the training split; Ctrl-C saves, rerunning resumes.

    With --set embedder.extractor=FILE (TorchScript, or .safetensors in the format of
    unpersonal.training.embedder) nothing is trained: that file's features are used instead.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _fit_embedder(resolved, run_dir, force)


def _fit_embedder(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.training.common import install_sigterm_as_interrupt
    from unpersonal.training.embedder import STAGE, run_fit_embedder

    install_sigterm_as_interrupt()
    if not run_fit_embedder(config, run, force):
        _up_to_date(run, STAGE)
        return
    meta = json.loads((run.stage_path(STAGE) / "embedder.json").read_text())
    auc = meta["linear_probe"]["mean_auc"]
    shown = "n/a (no label has both classes in train and test)" if auc is None else f"{auc:.3f}"
    what = (f"trained {meta['method']} embedder" if meta["source"] == "trained"
            else f"extractor {meta['extractor']['file']}")
    console.print(f"{what}: {meta['steps_done']} steps in {meta['seconds']:.0f} s, "
                  f"{meta['dim']}-d features, linear-probe mean AUC {shown} "
                  f"-> {run.stage_path(STAGE)}", soft_wrap=True)


@app.command("fit-reid")
def fit_reid(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
             config: ConfigOption = None, set_: SetOption = None,
             force: ForceOption = False) -> None:
    """Train the patient re-identification network; validate and calibrate it on held-out patients.

    Ctrl-C saves, rerunning resumes. Prints the held-out verification AUC and the threshold.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _fit_reid(resolved, run_dir, force)


def _fit_reid(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.training.common import install_sigterm_as_interrupt
    from unpersonal.training.reid import STAGE, run_fit_reid

    install_sigterm_as_interrupt()
    if not run_fit_reid(config, run, force):
        _up_to_date(run, STAGE)
        return
    meta = json.loads((run.stage_path(STAGE) / "reid.json").read_text())
    auc, fpr, caught = meta["auc"], meta["false_positive_rate"], meta["sensitivity_measured"]

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    console.print(
        f"re-ID held-out AUC: val {number(auc['val'])}, test {number(auc['test'])}, val+test "
        f"{number(auc['val+test'])}; threshold {meta['threshold']:.4g} flags same-patient pairs "
        f"{share(caught['val'])} val / {share(caught['test'])} test, different-patient pairs "
        f"(false positives) {share(fpr['val'])} val / {share(fpr['test'])} test; "
        f"{meta['steps_done']} steps (best {meta['best_step']}) in {meta['seconds']:.0f} s "
        f"-> {run.stage_path(STAGE)}", soft_wrap=True)


@app.command("calibrate")
def calibrate(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
              config: ConfigOption = None, set_: SetOption = None,
              force: ForceOption = False) -> None:
    """Calibrate the privacy filter's distance floors on held-out (validation) patients.

    Needs fit-embedder and fit-reid. The floors are a low quantile (privacy.floor_quantile) of
    how close held-out real images come to their nearest training image, in embedding and in
    pixel space; a synthetic image closer than that to a training image is rejected.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _calibrate(resolved, run_dir, force)


def _calibrate(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.privacy.filter import STAGE, run_calibrate

    if not run_calibrate(config, run, force):
        _up_to_date(run, STAGE)
        return
    summary = json.loads((run.stage_path(STAGE) / "floors.json").read_text())
    floors = summary["floors"]
    console.print(
        f"calibrated on {summary['n_heldout']} validation images: embedding floor "
        f"{floors['embedding']['value']:.4f} (cosine distance), pixel floor "
        f"{floors['pixel']['value']:.4f} (1 - correlation at the best shift), re-ID threshold "
        f"{summary['reid_threshold']:.4f} "
        f"against the source and {summary['reid_neighbour_threshold']:.4f} against any training "
        f"patient -> {run.stage_path(STAGE)}", soft_wrap=True)


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
    console.print(write_demo_data(resolved, out, layout))


@app.command("config")
def show_config(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
                config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (YAML) a command with these options would use."""
    resolved, _ = resolve_run(out, data, preset, config, set_)
    sys.stdout.write(resolved.to_yaml())


@app.command("fit-classifier")
def fit_classifier(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
                   config: ConfigOption = None, set_: SetOption = None,
                   force: ForceOption = False) -> None:
    """Train the classifier on the real training split and score it on the test split.

    The real-data baseline the synthetic data's utility is measured against (test ROC-AUC per
    class, with a patient-level bootstrap 95% interval). Ctrl-C saves, rerunning resumes.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _fit_classifier(resolved, run_dir, force)


def _fit_classifier(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.training.classifier import STAGE, run_fit_classifier
    from unpersonal.training.common import install_sigterm_as_interrupt

    install_sigterm_as_interrupt()
    if not run_fit_classifier(config, run, force):
        _up_to_date(run, STAGE)
    meta = json.loads((run.stage_path(STAGE) / "classifier.json").read_text())
    console.print(classifier_table(meta))
    training = meta["training"]
    console.print(f"trained for {training['epochs_run']} epochs (best {training['best_epoch']}, "
                  f"stopped by {training['stopped_by']}) in {training['seconds']:.0f} s "
                  f"-> {run.stage_path(STAGE)}", soft_wrap=True)


def classifier_table(meta: dict) -> Table:
    """Test ROC-AUC per class, then the mean with its bootstrap interval."""
    test = meta["test"]
    table = Table(title=f"test ROC-AUC ({test['images']:,} images)", title_justify="left")
    table.add_column("class")
    table.add_column("ROC-AUC", justify="right")
    for name in meta["label_names"]:
        auc = test["per_class"].get(name)
        table.add_row(name, "n/a (one class only)" if auc is None else f"{auc:.3f}")
    if test["mean"] is not None:
        low, high = test["ci95"]
        table.add_row("mean", f"{test['mean']:.3f} (95% CI {low:.3f}-{high:.3f})")
    return table


@app.command("generate")
def generate(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
             config: ConfigOption = None, set_: SetOption = None,
             force: ForceOption = False) -> None:
    """Generate the filtered synthetic set: candidates per training image, privacy filter,
    label-consistent survivor.

    Needs the run's fit-embedder, fit-reid, calibrate, fit-classifier and fit-diffusion stages.
    Writes synthetic/ (PNGs, labels.csv) and the private decisions.csv. Ctrl-C or a kill keeps
    every finished block; rerunning resumes and gives the same set. `accelerate launch
    --num_processes N -m unpersonal generate ...` splits the work and gives the same set too.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _generate(resolved, run_dir, force)


def _generate(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.sampling.generate import STAGE, run_generate
    from unpersonal.training.common import install_sigterm_as_interrupt

    install_sigterm_as_interrupt()
    try:
        fresh = run_generate(config, run, force)
    except KeyboardInterrupt:
        raise Interrupted("generate stopped; finished blocks are kept, rerun the same command "
                          "to resume") from None
    if not fresh:
        _up_to_date(run, STAGE)
    summary_path = run.stage_path(STAGE) / "generate.json"
    if not summary_path.is_file():  # a non-main process of a sharded run
        return
    summary = json.loads(summary_path.read_text())
    reasons = ", ".join(f"{check} {count}" for check, count in
                        summary["rejections_by_reason"].items())
    console.print(f"accepted {summary['accepted_sources']} of {summary['sources']} sources "
                  f"({summary['acceptance_rate']:.1%}), {summary['images']} images; "
                  f"{summary['candidates']} candidates drawn, rejected by {reasons}; "
                  f"{summary['nfe_per_accepted']:.0f} NFE and "
                  f"{summary['seconds_per_accepted']:.3f} s per image "
                  f"-> {run.stage_path(STAGE) / 'synthetic'}", soft_wrap=True)


@app.command("audit")
def audit(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
          config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False) -> None:
    """Privacy audit of the released set, with held-out real images as the baseline.

    Trains the audit's own embedder and re-ID network first (another seed and width than the
    filter's): re-identification rate, distance to closest record, membership inference,
    predicate singling-out, planted copies. Writes audit/privacy.json and audit/dcr.png.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _audit(resolved, run_dir, force)


def _audit(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.evaluation.audit import STAGE, load_privacy, run_audit
    from unpersonal.training.common import install_sigterm_as_interrupt

    install_sigterm_as_interrupt()
    if not run_audit(config, run, force):
        _up_to_date(run, STAGE)
    console.print(privacy_table(load_privacy(run)))
    console.print(f"-> {run.stage_path(STAGE) / 'privacy.json'}")


def privacy_table(figures: dict) -> Table:
    """Each privacy figure beside what held-out real images of new patients get."""
    table = Table(title=f"privacy audit of {figures['images']:,} released images",
                  title_justify="left")
    for column in ("figure", "released", "held-out baseline"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    reid = figures["reid_rate"]
    table.add_row("re-identified (linked to a training patient)", f"{reid['synthetic']:.1%}",
                  f"{reid['heldout']:.1%}")
    for space, dcr in figures["dcr"].items():
        table.add_row(f"closer than held-out 1st percentile ({space})",
                      f"{dcr['synthetic_share_below']:.1%}", f"{dcr['heldout_share_below']:.1%}")
    mia = figures["membership_inference"]
    table.add_row("membership inference AUC (distance / density)",
                  f"{mia['distance']['auc']:.3f} / {mia['density_ratio']['auc']:.3f}", "0.500")
    pso = figures["singling_out"]
    low, high = pso["max_ci"]
    table.add_row("singling-out excess (max over t)",
                  f"{pso['max_excess']:+.3f} ({low:+.3f} to {high:+.3f})", "0")
    planted = figures.get("planted_copies")
    if planted:
        table.add_row("planted near-copies caught", f"{planted['caught_all']:.1%}", "100%")
    return table


@app.command("evaluate")
def evaluate(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
             config: ConfigOption = None, set_: SetOption = None,
             force: ForceOption = False) -> None:
    """Fidelity, diversity and utility of the released set, each beside its real baseline.

    Trains the audit's own embedder if needed (the feature space), classifiers on real,
    synthetic and both (tested on the real test split), and a denoiser and a x2
    super-resolution network on real and on synthetic images. Writes eval/metrics.json.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _evaluate(resolved, run_dir, force)


def _evaluate(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.evaluation.evaluate import STAGE, load_metrics, run_evaluate
    from unpersonal.training.common import install_sigterm_as_interrupt

    install_sigterm_as_interrupt()
    if not run_evaluate(config, run, force):
        _up_to_date(run, STAGE)
    console.print(evaluation_table(load_metrics(run)))
    console.print(f"-> {run.stage_path(STAGE) / 'metrics.json'}")


def evaluation_table(metrics: dict) -> Table:
    """The headline figures beside the value real held-out images get."""
    fidelity, classes = metrics["fidelity"], metrics["utility"]["classification"]
    table = Table(title=f"evaluation of {metrics['synthetic_images']:,} synthetic images",
                  title_justify="left")
    for column in ("figure", "synthetic", "real reference"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    real, synthetic = classes["real"], classes["synthetic"]
    table.add_row("test ROC-AUC, classifier trained on it",
                  f"{synthetic['mean']:.3f} ({synthetic['ci95'][0]:.3f}-{synthetic['ci95'][1]:.3f})",
                  f"{real['mean']:.3f} ({real['ci95'][0]:.3f}-{real['ci95'][1]:.3f})")
    table.add_row("gap to real (pp)", f"{classes['gap_pp']:+.1f}", "")
    if "real+synthetic" in classes:
        both = classes["real+synthetic"]
        table.add_row("test ROC-AUC, real + synthetic", f"{both['mean']:.3f}", "")
    table.add_row("Fréchet distance to train", f"{fidelity['fd']:.4f}",
                  f"{fidelity['fd_real_test']:.4f}")
    for name in ("precision", "recall", "coverage"):
        table.add_row(name, f"{fidelity['prdc'][name]:.3f}",
                      f"{fidelity['prdc_real_test'][name]:.3f}")
    table.add_row("retrieval score", f"{fidelity['retrieval']['synthetic']:.3f}",
                  f"{fidelity['retrieval']['real_test']:.3f}")
    for task, figures in metrics["utility"].get("restoration", {}).items():
        table.add_row(f"{task} PSNR (dB), trained on it", f"{figures['synthetic']['psnr']['mean']:.2f}",
                      f"{figures['real']['psnr']['mean']:.2f}")
    return table


@app.command("report")
def report(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
           config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False) -> None:
    """Write the steward's report: one self-contained HTML page (internal: it shows real images)."""
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _report(resolved, run_dir, force)


def _report(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.report.html import STAGE, run_report

    if not run_report(config, run, force):
        _up_to_date(run, STAGE)
    console.print(f"report: {run.stage_path(STAGE) / 'index.html'}")


@app.command("export")
def export(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
           config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False) -> None:
    """Write the shareable release: images, labels.csv, DATASHEET.md, datasheet.json.

    Refuses, writing nothing, if any file would carry a patient ID or source reference, if an
    image equals a real one, or if an image was not accepted or fails the filter again.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_)
    _export(resolved, run_dir, force)


def _export(config: Config, run: RunDir, force: bool) -> None:
    from unpersonal.report.export import STAGE, run_export

    if not run_export(config, run, force):
        _up_to_date(run, STAGE)
    console.print(f"export: {run.stage_path(STAGE)}")


@app.command()
def run(out: OutOption = None, data: DataOption = None, preset: PresetOption = None,
        config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
        no_patient_ids: NoPatientIdsOption = False, csv: CsvOption = None) -> None:
    """Run every stage in order, skipping those already up to date; rerun to resume.

    prepare, fit-embedder, fit-reid, calibrate, fit-classifier, fit-diffusion, generate, audit,
    evaluate, report, export. Ends by printing where the report and the release are.
    """
    resolved, run_dir = resolve_run(out, data, preset, config, set_, no_patient_ids, csv)
    for stage in (_prepare, _fit_embedder, _fit_reid, _calibrate, _fit_classifier,
                  _fit_diffusion, _generate, _audit, _evaluate, _report, _export):
        stage(resolved, run_dir, force)
    console.print(f"report (internal, shows real images): {run_dir.root / 'report' / 'index.html'}")
    console.print(f"release (shareable): {run_dir.root / 'export'}")


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
