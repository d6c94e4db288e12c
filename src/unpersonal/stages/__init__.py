"""The stage registry: the one place a pipeline stage is declared.

A stage is a folder of the run directory made by one function from the folders of the stages
it reads and some sections of the config. `STAGES` lists them in the order `unpersonal run`
takes them; the CLI's commands, the cache keys and the benchmarks' stage lists derive from it.
Adding a stage is one module with its build function and one `Stage(...)` entry below.

    prepare -> fit-embedder -> fit-reid -> calibrate -> fit-classifier -> fit-diffusion
            -> generate -> audit-embedder, audit-reid -> audit -> eval -> report -> export
                 (sample: an unfiltered look at the generator, outside `run`)

Running a stage (`execute`) is the same for every one: check that every stage it reads is
finished, derive its cache key, skip it when the run directory already holds its outputs for
that key, else call its build function with a `StageTask` and print its line.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from unpersonal.config import Config
from unpersonal.rundir import RunDir, sha256_file, sha256_json

Lines = list[Any]  # what a stage prints: strings and rich renderables (tables)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as the registry declares it."""

    name: str
    """Its folder in the run directory, and its name in the manifest."""
    command: str
    """The `unpersonal` command that makes it (several stages may share one)."""
    help: str
    """What the command does, as `unpersonal COMMAND --help` shows it."""
    build: str
    """"module:function" that builds it from a `StageTask`; returns the figures `line` prints
    (None where this process publishes nothing: a non-main process of a sharded stage)."""
    reads: tuple[str, ...] = ()
    """Stages whose outputs it reads: they must be finished, and their hashes enter its key."""
    sections: tuple[str, ...] = ()
    """Config sections in its cache key (the seed always is)."""
    line: Callable[[dict[str, Any], Path], Lines] | None = None
    """What it prints from its figures and folder after building."""
    summary_file: str | None = None
    """The JSON its figures are kept in: printed again (through `line`) when it is up to date."""
    reads_if_present: tuple[str, ...] = ()
    """Stages it reads when the run has them (their hashes then enter its key)."""
    key_inputs: Callable[[Config, RunDir], dict[str, str]] | None = None
    """Inputs outside the run directory (a user's file), by content hash."""
    key_excludes: tuple[str, ...] = ()
    """"section.field"s of `sections` left out of its key: they change how fast it runs, not
    what it makes."""
    key_config: Callable[[Config], dict[str, Any]] | None = None
    """The config its key covers, where that is not simply `sections`."""
    derive_config: Callable[[Config], Config] | None = None
    """The config it builds with, derived from the user's (the audit's own models); such a
    stage leaves the run's config.yaml as it is."""
    reads_if_needed: tuple[str, ...] = ()
    """Stages it reads when the config needs them (their `needed`): they must then be finished,
    and their hashes enter its key."""
    needed: Callable[[Config], bool] | None = None
    """Whether a config uses this stage at all (None: always); `unpersonal run` makes only
    those it uses."""
    builds_first: tuple[str, ...] = ()
    """Stages its command brings up to date before it (the audit's models)."""
    in_run: bool = True
    """Whether `unpersonal run` makes it."""
    extra_options: tuple[str, ...] = field(default=())
    """CLI options beyond the run options: "data_format" for the dataset-reading ones,
    "release" for the audit's --release (audit any folder of images instead)."""


@dataclass
class StageTask:
    """What a build function gets: its stage, config and run directory, and the cache key."""

    stage: Stage
    config: Config
    run: RunDir
    key: str
    force: bool
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.stage.name

    def input(self, stage: str) -> Path:
        """The folder of a stage this one reads."""
        return self.run.stage_path(stage)

    @contextmanager
    def output(self) -> Iterator[Path]:
        """The folder to build in; published whole when the block ends without an error."""
        config = None if self.stage.derive_config is not None else self.config
        with self.run.build_stage(self.name, self.key, config, self.started) as folder:
            yield folder

    def work_dir(self) -> Path:
        """Resumable state (checkpoints) of this stage; emptied first under --force."""
        return self.run.resumable_work_dir(self.name, self.key, self.force)


# ---------------------------------------------------------------------------------------------
# Inputs the keys of some stages cover beyond the run directory


def _prepare_key_config(config: Config) -> dict[str, Any]:
    """The phantoms' settings matter only when the phantoms are the data."""
    return config.section_dump(("data",) if config.data.source else ("data", "phantoms"))


def _prepare_inputs(config: Config, run: RunDir) -> dict[str, str]:
    from unpersonal.data.prepare import fingerprint

    return {"data": fingerprint(config.data.source)}


def _extractor_inputs(config: Config, run: RunDir) -> dict[str, str]:
    from unpersonal.training.embedder import existing_file

    extractor = config.embedder.extractor
    return {} if extractor is None else {"extractor": sha256_file(existing_file(extractor))}


def _diffusion_inputs(config: Config, run: RunDir) -> dict[str, str]:
    """What fit-diffusion reads besides the prepared data: the pseudo-conditions' file and the
    starting weights (`diffusion.init`), by content."""
    from unpersonal.artifacts.denoiser import init_folder
    from unpersonal.training.diffusion import pseudo_source

    kind, path = pseudo_source(config.diffusion, run.stage_path("fit-embedder")
                               if run.stage_record("fit-embedder") else None)
    inputs = {} if path is None else {f"pseudo_features ({kind})": sha256_file(path)}
    if config.diffusion.init is not None:
        weights = init_folder(config.diffusion.init) / "ema.safetensors"
        if weights.is_file():  # missing: fit-diffusion says so
            inputs["init"] = sha256_file(weights)
    return inputs


def _latent(config: Config) -> bool:
    return config.diffusion.space == "latent"


def audit_config(config: Config) -> Config:
    """The config the audit's models train with: the filter's, with another seed and width.

    The audit must not restate the filter: a set selected to pass the filter's models would
    look private to those same models whatever it leaks. The user's own extractor, if any, is
    the filter's; the audit trains its own embedder.
    """
    settings = config.audit
    embedder = config.embedder.model_copy(update={"width": settings.embedder_width,
                                                  "extractor": None})
    reid = config.reid.model_copy(update={"width": settings.reid_width})
    return config.model_copy(update={"seed": config.seed + settings.seed_offset,
                                      "embedder": embedder, "reid": reid})


# ---------------------------------------------------------------------------------------------
# The registry


def _lines() -> Any:
    return importlib.import_module("unpersonal.stages.lines")


def _line(name: str) -> Callable[[dict[str, Any], Path], Lines]:
    """The line-printing function `name` of `stages.lines`, imported when first used."""
    return lambda figures, folder: getattr(_lines(), name)(figures, folder)


# Every candidate has its own noise seed, so the batch size changes how fast images are drawn,
# not which (tests/test_solvers.py). `sampling.count` is `unpersonal sample`'s alone: it must not
# make generate stale, or a look at the model with `sample --set sampling.count=...` would redo
# the release.
SPEED_ONLY = ("sampling.batch_size",)

FIT_EMBEDDER = Stage(
    "fit-embedder", "fit-embedder",
    "Train the self-supervised embedder on the training split; Ctrl-C saves, rerunning "
    "resumes.\n\nWith --set embedder.extractor=FILE (TorchScript, or .safetensors in the format "
    "of unpersonal.training.embedder) nothing is trained: that file's features are used instead.",
    build="unpersonal.stages.fit_embedder:build_fit_embedder", reads=("prepare",),
    sections=("embedder", "data"), key_inputs=_extractor_inputs, line=_line("fit_embedder"),
    summary_file="embedder.json")

FIT_REID = Stage(
    "fit-reid", "fit-reid",
    "Train the patient re-identification network; validate and calibrate it on held-out "
    "patients.\n\nCtrl-C saves, rerunning resumes. Prints the held-out verification AUC and the "
    "threshold.",
    build="unpersonal.stages.fit_reid:build_fit_reid", reads=("prepare",),
    sections=("reid", "data"), line=_line("fit_reid"), summary_file="reid.json")

STAGES: tuple[Stage, ...] = (
    Stage("prepare", "prepare",
          "Read a dataset into the run directory's canonical form, with a patient-level split.\n\n"
          "Refuses a patient in two splits, images without patient IDs, the same image in two "
          "splits, unreadable files and non-finite pixels, naming the file or row.",
          build="unpersonal.stages.prepare:build_prepare",
          key_config=_prepare_key_config, key_inputs=_prepare_inputs,
          line=_line("prepare"), summary_file="dataset.json", extra_options=("data_format",)),
    FIT_EMBEDDER,
    FIT_REID,
    Stage("calibrate", "calibrate",
          "Calibrate the privacy filter's distance floors on held-out (validation) patients.\n\n"
          "Needs fit-embedder and fit-reid. The floors are a low quantile "
          "(privacy.floor_quantile) of how close held-out real images come to their nearest "
          "training image, in embedding and in pixel space; a synthetic image closer than that "
          "to a training image is rejected.",
          build="unpersonal.stages.calibrate:build_calibrate",
          reads=("prepare", "fit-embedder", "fit-reid"), sections=("privacy",),
          line=_line("calibrate"), summary_file="floors.json"),
    Stage("fit-classifier", "fit-classifier",
          "Train the classifier on the real training split and score it on the test split.\n\n"
          "The real-data baseline the synthetic data's utility is measured against (test "
          "ROC-AUC per class, with a patient-level bootstrap 95% interval). Ctrl-C saves, "
          "rerunning resumes.",
          build="unpersonal.stages.fit_classifier:build_fit_classifier", reads=("prepare",),
          sections=("classifier", "data"), line=_line("fit_classifier"),
          summary_file="classifier.json"),
    Stage("fit-autoencoder", "fit-autoencoder",
          "Train the autoencoder latent diffusion works in (diffusion.space=latent); Ctrl-C "
          "saves, rerunning resumes.\n\nTrained on the training split alone; prints the "
          "validation images' reconstruction PSNR and SSIM. `unpersonal run` makes it only "
          "in latent space.",
          build="unpersonal.stages.fit_autoencoder:build_fit_autoencoder", reads=("prepare",),
          sections=("autoencoder",), needed=_latent, line=_line("fit_autoencoder"),
          summary_file="autoencoder.json"),
    Stage("fit-diffusion", "fit-diffusion",
          "Train the diffusion model on the training split; Ctrl-C saves, rerunning resumes.\n\n"
          "Runs on the CPU, one GPU, or many processes with `accelerate launch -m unpersonal "
          "...`. With diffusion.space=latent it denoises the latents of fit-autoencoder's "
          "autoencoder. With diffusion.privacy.epsilon=E it trains with patient-level "
          "differential privacy (DP-SGD); --init RUN starts from another run's denoiser.",
          build="unpersonal.stages.fit_diffusion:build_fit_diffusion", reads=("prepare",),
          reads_if_present=("fit-embedder",), reads_if_needed=("fit-autoencoder",),
          sections=("diffusion",),
          key_inputs=_diffusion_inputs, line=_line("fit_diffusion"), summary_file="model.json",
          extra_options=("init",)),
    Stage("sample", "sample",
          "Draw unfiltered images from the trained model, with a real-vs-synthetic grid to look "
          "at.\n\nSolver, steps, guidance and count come from the sampling section, e.g. --set "
          "sampling.solver=heun --set sampling.steps=32. Nothing drawn here is filtered or "
          "exportable.",
          build="unpersonal.stages.sample:build_sample", reads=("fit-diffusion", "prepare"),
          sections=("sampling",), key_excludes=SPEED_ONLY,
          line=_line("sample"), summary_file="sampling.json", in_run=False),
    Stage("generate", "generate",
          "Generate the filtered synthetic set: candidates per training image, privacy filter, "
          "label-consistent survivor.\n\nNeeds the run's fit-embedder, fit-reid, calibrate, "
          "fit-classifier and fit-diffusion stages. Writes synthetic/ (PNGs, labels.csv) and the "
          "private decisions.csv. Ctrl-C or a kill keeps every finished block; rerunning resumes "
          "and gives the same set. `accelerate launch --num_processes N -m unpersonal generate "
          "...` splits the work and gives the same set too.",
          build="unpersonal.stages.generate:build_generate",
          reads=("prepare", "fit-embedder", "fit-reid", "calibrate", "fit-classifier",
                 "fit-diffusion"),
          sections=("sampling", "generate", "privacy"),
          key_excludes=(*SPEED_ONLY, "sampling.count"),
          line=_line("generate"), summary_file="generate.json"),
    replace(FIT_EMBEDDER, name="audit-embedder", command="audit", derive_config=audit_config,
            help="The audit's own embedder: trained like fit-embedder's, with another seed and "
                 "width, never the user's extractor."),
    replace(FIT_REID, name="audit-reid", command="audit", derive_config=audit_config,
            help="The audit's own re-identification network: trained like fit-reid's, with "
                 "another seed and width."),
    Stage("audit", "audit",
          "Privacy audit of the released set, with held-out real images as the baseline.\n\n"
          "Trains the audit's own embedder and re-ID network first (another seed and width than "
          "the filter's): re-identification rate, distance to closest record, membership "
          "inference, predicate singling-out, planted copies. Writes audit/privacy.json and "
          "audit/dcr.png.\n\nWith --release DIR, audits that folder of images instead (any "
          "generator's; labels.csv optional) against the run's private data, and writes "
          "privacy.json, dcr.png and AUDIT.md to --to (default RUN/audit-release/DIR_NAME).",
          build="unpersonal.stages.audit:build_audit",
          reads=("prepare", "generate", "audit-embedder", "audit-reid"),
          sections=("audit", "privacy"), builds_first=("audit-embedder", "audit-reid"),
          line=_line("audit"), summary_file="privacy.json", extra_options=("release",)),
    Stage("eval", "evaluate",
          "Fidelity, diversity and utility of the released set, each beside its real "
          "baseline.\n\nTrains the audit's own embedder if needed (the feature space), "
          "classifiers on real, synthetic and both (tested on the real test split), and a "
          "denoiser and a x2 super-resolution network on real and on synthetic images. Writes "
          "eval/metrics.json.",
          build="unpersonal.stages.evaluate:build_evaluate",
          reads=("prepare", "generate", "audit-embedder", "fit-classifier"),
          reads_if_present=("audit",), sections=("evaluate", "classifier"),
          builds_first=("audit-embedder", "audit-reid"),
          line=_line("evaluate"), summary_file="metrics.json"),
    Stage("report", "report",
          "Write the steward's report: one self-contained HTML page (internal: it shows real "
          "images).",
          build="unpersonal.stages.report:build_report",
          reads=("prepare", "generate", "audit", "eval", "audit-embedder"),
          line=_line("report")),
    Stage("export", "export",
          "Write the shareable release: images/, metadata.csv (the labels), README.md (a dataset "
          "card with the datasheet), datasheet.json and croissant.json; it loads with Hugging "
          "Face's imagefolder, MONAI or Croissant.\n\n"
          "Refuses, writing nothing, if any file would carry a patient ID or source reference, "
          "if an image equals a real one, or if an image was not accepted or fails the filter "
          "again.",
          build="unpersonal.stages.export:build_export",
          reads=("prepare", "generate", "calibrate", "audit", "eval"), line=_line("export")),
)



def stage(name: str) -> Stage:
    """The registry's entry for a stage folder."""
    return next(entry for entry in STAGES if entry.name == name)


def commands() -> dict[str, list[Stage]]:
    """Each command with the stages it runs, in order: the stages it makes, each after the
    ones it builds first (`unpersonal audit` trains the audit's models, then audits)."""
    made: dict[str, list[Stage]] = {}
    for entry in STAGES:
        chain = made.setdefault(entry.command, [])
        if _made_first(entry):
            continue
        for name in entry.builds_first:
            if stage(name) not in chain:
                chain.append(stage(name))
        chain.append(entry)
    return made


def _made_first(entry: Stage) -> bool:
    """Whether a stage is made only as another's `builds_first` (the audit's models)."""
    return any(entry.name in other.builds_first for other in STAGES)


def pipeline(config: Config | None = None) -> list[Stage]:
    """What `unpersonal run` makes, in order: under `config`, only the stages it needs."""
    return [entry for entry in STAGES
            if entry.in_run and (config is None or is_needed(entry, config))]


def downstream_of(name: str) -> list[str]:
    """Every stage that reads `name`, directly or through another: what a new `name` makes
    stale."""
    stale: list[str] = []
    for entry in STAGES:
        if any(read == name or read in stale
               for read in (*entry.reads, *entry.reads_if_present, *entry.reads_if_needed)):
            stale.append(entry.name)
    return stale


# ---------------------------------------------------------------------------------------------
# Running a stage


def config_for(entry: Stage, config: Config) -> Config:
    return entry.derive_config(config) if entry.derive_config is not None else config


def stage_key(entry: Stage, config: Config, run: RunDir) -> str:
    """The cache key: the config it covers plus the hashes of every input it reads."""
    settings = (entry.key_config(config) if entry.key_config is not None
                else config.section_dump(entry.sections))
    for excluded in entry.key_excludes:
        section, name = excluded.split(".")
        settings[section] = {k: v for k, v in settings[section].items() if k != name}
    inputs: dict[str, Any] = {name: require(run, name) for name in reads(entry, config)}
    inputs.update({name: require(run, name) for name in entry.reads_if_present
                   if run.stage_record(name) is not None})
    if entry.key_inputs is not None:
        inputs.update(entry.key_inputs(config, run))
    return sha256_json({"config": settings, "inputs": inputs})


def check_inputs(chain: list[Stage], config: Config, run: RunDir) -> None:
    """Refuse before anything runs when a stage the chain reads is neither finished nor made
    by the chain itself (audit on a run without generate must not train the audit's models
    first)."""
    made = {entry.name for entry in chain}
    for entry in chain:
        for name in reads(entry, config):
            if name not in made:
                require(run, name)


def reads(entry: Stage, config: Config) -> tuple[str, ...]:
    """The stages `entry` must read under `config`: its reads, and those of its
    reads_if_needed that the config needs."""
    return (*entry.reads,
            *(name for name in entry.reads_if_needed if is_needed(stage(name), config)))


def is_needed(entry: Stage, config: Config) -> bool:
    return entry.needed is None or entry.needed(config)


def require(run: RunDir, name: str) -> dict[str, str]:
    """A finished stage's output hashes, or an error naming the command that makes it."""
    return run.require(name, stage(name).command)


def build_function(entry: Stage) -> Callable[[StageTask], dict[str, Any] | None]:
    module, function = entry.build.split(":")
    return getattr(importlib.import_module(module), function)


@dataclass
class Outcome:
    """What running one stage did, for the CLI to print."""

    stage: Stage
    built: bool
    figures: dict[str, Any] | None


def execute(entry: Stage, config: Config, run: RunDir, force: bool = False) -> Outcome:
    """Bring one stage up to date: skip it when fresh, else build and publish it."""
    derived = config_for(entry, config)
    key = stage_key(entry, derived, run)
    if not force and run.is_fresh(entry.name, key):
        return Outcome(entry, False, None)
    figures = build_function(entry)(StageTask(entry, derived, run, key, force))
    return Outcome(entry, True, figures)


def outcome_lines(outcome: Outcome, run: RunDir) -> Lines:
    """What the CLI prints after a stage: its figures, re-read from its summary file when it
    was up to date."""
    entry, folder = outcome.stage, run.stage_path(outcome.stage.name)
    shown: Lines = []
    if not outcome.built:
        shown.append(f"{entry.name}: up to date in {folder} (--force redoes it)")
    figures = outcome.figures
    if figures is None and not outcome.built and entry.summary_file is not None:
        figures = _read_summary(folder / entry.summary_file)
    if entry.line is not None and (figures is not None or entry.summary_file is None):
        shown += entry.line(figures or {}, folder)
    return shown


def _read_summary(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


