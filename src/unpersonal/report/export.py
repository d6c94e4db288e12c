"""`unpersonal export`: the shareable release, checked before it is written.

    run/export/
        images/syn-000000.png ...   the released synthetic images, as generate wrote them
        metadata.csv                file_name, one column per label (`unpersonal.release`)
        README.md                   the dataset card: the Hub's metadata header, the datasheet
                                    (what the data is, how it was made, its privacy audit with
                                    baselines, its utility, intended use and limits), and how
                                    to load it (`unpersonal.report.card`)
        datasheet.json              the datasheet as data
        croissant.json              Croissant 1.0 metadata

Export refuses (and writes nothing) unless every file it would write passes three checks:

1. no patient ID and no source reference of the input occurs in any file (as text);
2. no exported image equals a real image of the input, pixel for pixel;
3. every exported image is one generate accepted (its file name is in an accepted row of the
   private decision log) and passes the privacy filter when checked again from scratch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unpersonal import __version__
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError
from unpersonal.evaluation.evaluate import TRAINING_SET_TITLES, TRAINING_SETS
from unpersonal.privacy.filter import PrivacyFilter
from unpersonal.progress import track
from unpersonal.release import LABELS_FILE, METADATA_FILE, read_pixels
from unpersonal.report.card import summary
from unpersonal.report.summary import equivalence_verdict, release_verdicts, verdict_table

DATASHEET_SCHEMA = 1


def check_released_images(dataset: CanonicalDataset, folder: Path, names: list[str],
                          decisions: Path, privacy_filter: PrivacyFilter) -> None:
    """Checks 2 and 3: no real image, nothing generate did not accept (by generate's private
    decision log, `decisions`), nothing the filter rejects today."""
    accepted = _accepted_files(decisions)
    unknown = [name for name in names if name not in accepted]
    if unknown:
        raise UserError(f"export refused: {folder / unknown[0]} is not an image generate "
                        f"accepted ({len(unknown)} such files)")
    if not names:
        raise UserError("export refused: generate accepted no image, there is nothing to release")
    pixels = np.stack(list(track(read_pixels(folder, names), len(names),
                                 "export: re-checking images")))
    real = {hashlib.sha256(image.tobytes()).hexdigest() for image in dataset.images}
    copies = [name for name, image in zip(names, pixels)
              if hashlib.sha256(image.tobytes()).hexdigest() in real]
    if copies:
        raise UserError(f"export refused: {folder / copies[0]} is identical to a real input "
                        f"image ({len(copies)} such files)")
    unit = pixels.astype(np.float32) / float((1 << dataset.bit_depth) - 1)
    rejected = privacy_filter.check(unit).rejected
    if rejected.any():
        first = names[int(np.flatnonzero(rejected)[0])]
        raise UserError(f"export refused: {folder / first} fails the privacy filter when "
                        f"checked again ({int(rejected.sum())} such files); rerun generate")


def _accepted_files(decisions: Path) -> set[str]:
    with open(decisions, newline="") as handle:
        return {row["synthetic_file"] for row in csv.DictReader(handle)
                if row["outcome"].startswith("accepted") and row["synthetic_file"]}


def check_no_identifiers(files: dict[str, bytes], dataset: CanonicalDataset) -> None:
    """Check 1: no patient ID or source reference in a file's name or text, nor any text chunk
    in an image.

    Text is matched on whole tokens, so "P1" is not found inside "P12" and an ID does not hide
    inside a longer word. A short all-digit ID ("17") would also match counts and figures, so
    those are checked in file names and the label table's path column only; an ID with a letter or
    of six characters or more is checked everywhere.

    Each set of secrets is one compiled alternation: a real dataset has ten thousand IDs and
    references, and searching them one by one took two seconds per file (hours per release).
    """
    secrets = {str(value).strip() for value in np.unique(dataset.patient_id)} | {
        str(value).strip() for value in np.unique(dataset.ref)}
    secrets.discard("")
    in_names = _token_pattern(secrets)
    in_text = _token_pattern({secret for secret in secrets
                              if not secret.isdigit() or len(secret) >= 6})
    for relative, content in files.items():
        found = _tokens(in_names, relative)
        if not found and relative.endswith(".png"):
            if Image.open(io.BytesIO(content)).text:
                raise UserError(f"export refused: {relative} carries PNG text chunks")
        elif not found:
            text = content.decode("utf-8")
            found = _tokens(in_text, text)
            if relative in (LABELS_FILE, METADATA_FILE):
                paths = "\n".join(row.split(",", 1)[0] for row in text.splitlines()[1:])
                found += _tokens(in_names, paths)
        if found:
            raise UserError(f"export refused: {relative} contains a patient ID or source "
                            f"reference of the input ({found[0][:2]}...)")


def _token_pattern(secrets: set[str]) -> re.Pattern[str] | None:
    """One pattern matching any secret as a whole token (longest first, so a secret that is a
    prefix of another does not shadow it)."""
    if not secrets:
        return None
    alternatives = "|".join(re.escape(s) for s in sorted(secrets, key=lambda s: (-len(s), s)))
    return re.compile(rf"(?<![\w.-])(?:{alternatives})(?![\w-])")


def _tokens(pattern: re.Pattern[str] | None, text: str) -> list[str]:
    return pattern.findall(text) if pattern is not None else []


def datasheet(dataset: CanonicalDataset, images: int, metrics: dict[str, Any],
              privacy: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """The release's facts as data: deterministic (no dates, no timings), nothing identifying."""
    classification = metrics["utility"]["classification"]
    return {
        "schema": DATASHEET_SCHEMA, "made_with": f"unpersonal {__version__}",
        "what": {"images": images, "resolution": dataset.resolution,
                 "bit_depth": dataset.bit_depth, "label_kind": dataset.label_kind,
                 "labels": dataset.label_names},
        "how": {"generator": generation["settings"].get("generator", "EDM-preconditioned "
                                                        "diffusion model")
                             + ", sampled once or more per training image (its source), each "
                             "candidate drawn from " + generation["settings"].get(
                                 "drawn_from", "its source's labels and embedding"),
                "filter": "re-identification against every training patient (threshold "
                          "calibrated on held-out patients) and distance floors in feature "
                          "and pixel space; the label-consistent survivor kept",
                "settings": generation["settings"],
                "acceptance_rate": generation["acceptance_rate"],
                "sources_skipped": generation["skipped_sources"]},
        "privacy": {"verdicts": [v.to_json() for v in release_verdicts(metrics, privacy)],
                    "reid_rate": privacy["reid_rate"],
                    "dcr_share_below_heldout_q01": {
                        space: dcr["synthetic_share_below"] for space, dcr in privacy["dcr"].items()},
                    "membership_inference_auc": {
                        attack: privacy["membership_inference"][attack]["auc"]
                        for attack in ("distance", "density_ratio")},
                    "singling_out_excess": privacy["singling_out"]["max_excess"],
                    "singling_out_excess_ci95": privacy["singling_out"]["max_ci"],
                    "planted_copies_caught": (privacy.get("planted_copies") or {}).get(
                        "caught_all"),
                    "identity_probes": privacy.get("identity_probes"),
                    "tests": privacy["tests"]},
        "utility": {"classification_auc": {name: classification[name]["mean"] for name in
                                           TRAINING_SETS if name in classification},
                    "classification_auc_ci95": {name: classification[name]["ci95"] for name in
                                                TRAINING_SETS if name in classification},
                    "gap_pp": classification["gap_pp"],
                    "classifier_seeds": classification["seeds"],
                    "restoration_psnr": {
                        task: {"real": r["real"]["psnr"]["mean"],
                               "synthetic": r["synthetic"]["psnr"]["mean"],
                               "equivalent": equivalence_verdict(r)}
                        for task, r in metrics["utility"].get("restoration", {}).items()}},
        "fidelity": {"fd": metrics["fidelity"]["fd"],
                     "fd_real_test": metrics["fidelity"]["fd_real_test"],
                     "precision_recall_density_coverage": metrics["fidelity"]["prdc"],
                     "retrieval_score": metrics["fidelity"]["retrieval"]},
        "intended_use": "Method development, teaching and benchmarking of image analysis where "
                        "the real images cannot be shared. Not for clinical decisions about any "
                        "patient, and not a source of new medical findings.",
        "limits": ["The images imitate the training set: its population, scanners and label "
                   "noise, at the released resolution.",
                   _privacy_limit(generation["settings"].get("differential_privacy")),
                   "Labels are the source images' labels; a synthetic image may show its "
                   "finding less clearly than a real one."],
    }


def _privacy_limit(differential_privacy: dict[str, Any] | None) -> str:
    """What the privacy figures are, and are not, in one sentence."""
    if differential_privacy is None:
        return ("Privacy figures are measured against this release's held-out patients; they "
                "are evidence, not a formal guarantee such as differential privacy.")
    return ("The generator's weights are differentially private with respect to each training "
            f"{differential_privacy['unit']} (epsilon = {differential_privacy['epsilon']:.2f}, "
            f"delta = {differential_privacy['delta']:g}); the release as a whole is not: each "
            "image was drawn for a training image (from its labels), and the privacy filter "
            "and the label gate chose among the drawn images by comparing them with the real "
            "training images, none of which that guarantee covers. The privacy figures, "
            "measured against held-out patients, are evidence beside it.")


def datasheet_markdown(sheet: dict[str, Any]) -> str:
    how, utility = sheet["how"], sheet["utility"]
    lines = [
        "# Datasheet", "", summary(sheet) + ".", "",
        "## How it was made", "", f"* Generator: {how['generator']}.",
        f"* Privacy filter: {how['filter']}.",
        f"* Acceptance: {how['acceptance_rate']:.1%} of source images yielded an image; "
        f"{how['sources_skipped']} were skipped.", "",
        "## Privacy audit (judged by models the filter did not use; baseline: real images of "
        "patients never trained on)", "",
        *verdict_table(sheet["privacy"]["verdicts"])]
    seeds = utility["classifier_seeds"]
    over = "one training seed" if seeds == 1 else f"mean over {seeds} training seeds"
    lines += ["", "## Utility", "", f"Classifier test ROC-AUC (real test images, {over}):", ""]
    for name, auc in utility["classification_auc"].items():
        low, high = utility["classification_auc_ci95"][name]
        lines.append(f"* trained on {TRAINING_SET_TITLES.get(name, name)}: {auc:.3f} "
                     f"(95% CI {low:.3f}-{high:.3f})")
    lines.append(f"* gap, synthetic minus real: {utility['gap_pp']:+.2f} percentage points")
    for task, psnr in utility["restoration_psnr"].items():
        lines.append(f"* {task} network PSNR on real test images: {psnr['synthetic']:.2f} dB "
                     f"trained on synthetic, {psnr['real']:.2f} dB trained on real; "
                     f"equivalent: {psnr['equivalent']}")
    lines += ["", "## Intended use", "", sheet["intended_use"], "", "## Limits", ""]
    lines += [f"* {limit}" for limit in sheet["limits"]]
    return "\n".join(lines) + "\n"

