"""What each stage prints when it is done: one line, or a table a steward reads, from its figures.

Each function takes the figures the stage returned (the content of its summary JSON) and its
folder, and returns strings and rich tables; the registry names which one a stage prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from unpersonal.evaluation.evaluate import TRAINING_SET_TITLES, TRAINING_SETS
from unpersonal.report.summary import leak_sensitivity

Lines = list[Any]


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def prepare(meta: dict[str, Any], folder: Path) -> Lines:
    """Notes and warnings from reading, then patients per split and label balance: what a
    steward checks before anything is trained."""
    people, balance = summary_tables(meta["summary"], meta["label_names"])
    said = [Text.assemble(("note: ", "cyan"), message) for message in meta.get("notes", [])]
    said += [Text.assemble(("warning: ", "yellow"), message)
             for message in meta.get("warnings", [])]
    return [*said, people, balance,
            f"prepared {meta['n_images']} images at {meta['resolution']} px, "
            f"{meta['bit_depth']}-bit, {meta['label_kind']} labels -> {folder}"]


def summary_tables(summary: dict[str, Any], label_names: list[str]) -> tuple[Table, Table]:
    """Patients per split, and positive images per label and split."""
    splits = summary["splits"]
    probes = summary.get("identity_probes", {"images": 0})
    people = Table(title="prepared dataset", title_justify="left",
                   caption=f"patients shared between splits: {summary['shared_patients']}; "
                           f"identity probes held back from training: {probes['images']:,} "
                           "(one image each of as many training patients)")
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
        cells = [f"{row['positives'][name]:,} "
                 f"({100 * row['positives'][name] / max(row['images'], 1):.0f}%)"
                 for row in splits.values()]
        balance.add_row(name, *cells)
    return people, balance


def fit_autoencoder(meta: dict[str, Any], folder: Path) -> Lines:
    val = meta["reconstruction"]["val"]
    quality = ("no validation images" if val["psnr"] is None
               else f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.3f}")
    shape = "x".join(str(size) for size in meta["latent_shape"])
    return [f"trained {meta['parameters']:,}-parameter autoencoder for {meta['steps_done']} steps "
            f"in {meta['seconds']:.0f} s: {meta['resolution']} px -> {shape} latents, {quality} "
            f"-> {folder}"]


def fit_diffusion(meta: dict[str, Any], folder: Path) -> Lines:
    space = "" if meta.get("latent") is None else " latent"
    lines = [f"trained {meta['parameters']:,}-parameter{space} denoiser for "
             f"{meta['steps_done']} steps in {meta['seconds']:.0f} s -> {folder}"]
    if meta.get("init") is not None:
        lines.append(f"started from a denoiser trained on {meta['init']['trained_on']}")
    if meta.get("privacy") is not None:
        privacy = meta["privacy"]
        lines.append(f"patient-level differential privacy: epsilon {privacy['epsilon']:.2f} "
                     f"(target {privacy['epsilon_target']:g}), delta {privacy['delta']:g}, noise "
                     f"multiplier {privacy['noise_multiplier']:.2f}, {privacy['accountant']}")
    return lines


def sample(report: dict[str, Any], folder: Path) -> Lines:
    return [f"sampled {report['count']} images with {report['solver']}, "
            f"{report['nfe_per_image']} NFE each, {report['images_per_s']:.2f} images/s "
            f"-> {folder / 'grid.png'}"]


def fit_embedder(meta: dict[str, Any], folder: Path) -> Lines:
    auc = meta["linear_probe"]["mean_auc"]
    shown = "n/a (no label has both classes in train and test)" if auc is None else f"{auc:.3f}"
    what = (f"trained {meta['method']} embedder" if meta["source"] == "trained"
            else f"extractor {meta['extractor']['file']}")
    return [f"{what}: {meta['steps_done']} steps in {meta['seconds']:.0f} s, {meta['dim']}-d "
            f"features, linear-probe mean AUC {shown} -> {folder}"]


def fit_reid(meta: dict[str, Any], folder: Path) -> Lines:
    def per_split(shares: dict[str, float | None]) -> str:
        return f"{_share(shares['val'])} val / {_share(shares['test'])} test"

    auc = ", ".join(f"{split} {_number(meta['auc'][split])}" for split in ("val", "test", "val+test"))
    return ["; ".join([
        f"re-ID held-out AUC: {auc}",
        f"threshold {meta['threshold']:.4g} flags same-patient pairs "
        f"{per_split(meta['sensitivity_measured'])}, different-patient pairs (false positives) "
        f"{per_split(meta['false_positive_rate'])}",
        f"{meta['steps_done']} steps (best {meta['best_step']}) in {meta['seconds']:.0f} s "
        f"-> {folder}"])]


def calibrate(summary: dict[str, Any], folder: Path) -> Lines:
    meaning = {"embedding": "cosine distance", "pixel": "1 - correlation at the best shift"}
    floors = ", ".join(f"{space} floor {floor['value']:.4f} ({meaning[space]})"
                       for space, floor in summary["floors"].items())
    thresholds = (f"re-ID threshold {summary['reid_threshold']:.4f} against the source and "
                  f"{summary['reid_neighbour_threshold']:.4f} against any training patient")
    return [f"calibrated on {summary['n_heldout']} validation images: {floors}, {thresholds} "
            f"-> {folder}"]


def fit_classifier(meta: dict[str, Any], folder: Path) -> Lines:
    training = meta["training"]
    return [classifier_table(meta),
            f"trained for {training['epochs_run']} epochs (best {training['best_epoch']}, "
            f"stopped by {training['stopped_by']}) in {training['seconds']:.0f} s -> {folder}"]


def classifier_table(meta: dict[str, Any]) -> Table:
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


def generate(summary: dict[str, Any], folder: Path) -> Lines:
    reasons = ", ".join(f"{check} {count}" for check, count in
                        summary["rejections_by_reason"].items())
    return [f"accepted {summary['accepted_sources']} of {summary['sources']} sources "
            f"({summary['acceptance_rate']:.1%}), {summary['images']} images; "
            f"{summary['candidates']} candidates drawn, rejected by {reasons}; "
            f"{summary['nfe_per_accepted']:.0f} NFE and {summary['seconds_per_accepted']:.3f} s "
            f"per image -> {folder / 'synthetic'}"]


def audit(figures: dict[str, Any], folder: Path) -> Lines:
    return [privacy_table(figures), f"-> {folder / 'privacy.json'}"]


def privacy_table(figures: dict[str, Any]) -> Table:
    """Each privacy figure beside what held-out real images of new patients get, with its
    test's p-value after Holm's correction."""
    tests = figures["tests"]
    verdict = "passes" if tests["passed"] else "FAILS"
    table = Table(title=f"privacy audit of {figures['images']:,} released images: {verdict} "
                        f"(family-wise alpha {tests['alpha']:g})", title_justify="left")
    for column in ("figure", "released", "held-out baseline", "p (adjusted)"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    by_figure = tests["by_figure"]

    def adjusted(*names: str) -> str:
        worst = min(by_figure[name]["p_adjusted"] for name in names)
        return f"{worst:.2g}" + (" fail" if worst <= tests["alpha"] else "")

    reid = figures["reid_rate"]
    table.add_row("re-identified (linked to a training patient)", f"{reid['synthetic']:.1%}",
                  f"{reid['heldout']:.1%}", adjusted("reid_rate"))
    for space, dcr in figures["dcr"].items():
        table.add_row(f"closer than held-out 1st percentile ({space})",
                      f"{dcr['synthetic_share_below']:.1%}", f"{dcr['heldout_share_below']:.1%}",
                      adjusted(f"dcr_{space}_q01", f"dcr_{space}_min"))
    mia = figures["membership_inference"]
    table.add_row("membership inference AUC (distance / density)",
                  f"{mia['distance']['auc']:.3f} / {mia['density_ratio']['auc']:.3f}", "0.500",
                  adjusted("mia_distance", "mia_density_ratio"))
    pso = figures["singling_out"]
    low, high = pso["max_ci"]
    table.add_row("singling-out excess (max over t)",
                  f"{pso['max_excess']:+.3f} ({low:+.3f} to {high:+.3f})", "0",
                  adjusted("singling_out"))
    planted = figures.get("planted_copies")
    if planted:
        table.add_row("planted near-copies caught", f"{planted['caught_all']:.1%}", "100%", "")
    detectable = tests.get("detectable_copy_share")
    if detectable is not None and detectable > 0.01:
        table.caption = (f"{leak_sensitivity(figures)} More held-out patients "
                         "(data.split_fractions) let it see smaller leaks.")
    probes = figures.get("identity_probes")
    if probes:
        table.add_row("identity probes linked (unseen images of training patients)",
                      f"{probes['linked']:.1%}", f"{probes['heldout_linked']:.1%}",
                      f"{probes['p_value']:.2g}")
    return table


def evaluate(metrics: dict[str, Any], folder: Path) -> Lines:
    return [evaluation_table(metrics), f"-> {folder / 'metrics.json'}"]


def evaluation_table(metrics: dict[str, Any]) -> Table:
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
    table.add_row("gap to real (pp)", f"{classes['gap_pp']:+.2f}", "")
    for name in TRAINING_SETS[2:]:
        if name in classes:
            table.add_row(f"test ROC-AUC, {TRAINING_SET_TITLES[name]}",
                          f"{classes[name]['mean']:.3f}", "")
    table.add_row("Fréchet distance to train", f"{fidelity['fd']:.4f}",
                  f"{fidelity['fd_real_test']:.4f}")
    for name in ("precision", "recall", "coverage"):
        table.add_row(name, f"{fidelity['prdc'][name]:.3f}",
                      f"{fidelity['prdc_real_test'][name]:.3f}")
    table.add_row("retrieval score", f"{fidelity['retrieval']['synthetic']:.3f}",
                  f"{fidelity['retrieval']['real_test']:.3f}")
    for task, figures in metrics["utility"].get("restoration", {}).items():
        table.add_row(f"{task} PSNR (dB), trained on it",
                      f"{figures['synthetic']['psnr']['mean']:.2f}",
                      f"{figures['real']['psnr']['mean']:.2f}")
    return table


def report(figures: dict[str, Any], folder: Path) -> Lines:
    return [f"report: {folder / 'index.html'}"]


def export(figures: dict[str, Any], folder: Path) -> Lines:
    return [f"export: {folder}"]
