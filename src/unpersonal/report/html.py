"""`unpersonal report`: one self-contained HTML page a data steward can read without the tool.

    run/report/index.html   images and plots embedded (base64): one file to open or archive

It shows real training images beside synthetic ones, which is how a steward sees there is no
copy, so it is an internal document and never part of the export.
"""

from __future__ import annotations

import base64
import io
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image

from unpersonal.artifacts.embedder import load_embedder
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.evaluation.evaluate import TRAINING_SET_TITLES, TRAINING_SETS
from unpersonal.evaluation.sets import SyntheticSet
from unpersonal.privacy.knn import NeighbourIndex
from unpersonal.report.summary import equivalence_verdict, leak_sensitivity, release_verdicts

GRID_COLUMNS = 8
PAIRS = 12
THUMBNAIL = 96


@dataclass
class ReportInputs:
    """What the page shows, read from the run by the report stage."""

    title: str
    dataset: CanonicalDataset
    released: SyntheticSet
    metrics: dict[str, Any]  # eval/metrics.json
    privacy: dict[str, Any]  # audit/privacy.json
    generation: dict[str, Any]  # generate/generate.json
    dcr_png: Path
    roc_png: Path
    embedder: Path  # the audit embedder's folder: nearest training image of each sample
    seed: int
    config_yaml: str


def render(inputs: ReportInputs) -> str:
    """The self-contained page."""
    train = inputs.dataset.subset("train")
    released, metrics, privacy = inputs.released, inputs.metrics, inputs.privacy
    classification = metrics["utility"]["classification"]
    training_sets = [name for name in TRAINING_SETS if name in classification]
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent),
                              autoescape=select_autoescape(["html", "j2"]))
    return environment.get_template("template.html.j2").render(
        title=inputs.title, images=len(released.images), training_images=len(train),
        training_patients=len(np.unique(train.patient_id)), date=time.strftime("%Y-%m-%d"),
        versions=versions(), verdicts=release_verdicts(metrics, privacy),
        privacy_note=privacy_note(privacy),
        grids=class_grids(train, released.images, released.labels),
        multilabel=train.label_kind == "multilabel",
        pairs=nearest_pairs(inputs.embedder, inputs.dataset, released.images, released.names,
                            inputs.seed),
        heldout_q01=privacy["dcr"]["embedding"]["heldout_q01"],
        dcr_png=_read_b64(inputs.dcr_png), roc_png=_read_b64(inputs.roc_png),
        classification=classification, training_sets=training_sets,
        titles=TRAINING_SET_TITLES, equivalence_cell=equivalence_verdict,
        per_label=per_label_rows(classification, training_sets),
        gaps={name: "" if name == "real" else
              f"{classification['gap_pp' + ('' if name == 'synthetic' else '_' + name)]:+.1f}"
              for name in training_sets},
        restoration=metrics["utility"].get("restoration"),
        fidelity_rows=fidelity_rows(metrics["fidelity"]),
        generation_rows=generation_rows(inputs.generation), config_yaml=inputs.config_yaml)


def per_label_rows(classification: dict[str, Any], training_sets: list[str]
                   ) -> list[dict[str, Any]]:
    """Test ROC-AUC of each label (class) for each training set, when there are several."""
    names = list(classification["real"].get("per_class", {}))
    if len(names) < 2:
        return []
    return [{"label": name, "auc": [classification[which]["per_class"].get(name)
                                    for which in training_sets]} for name in names]


def privacy_note(privacy: dict[str, Any]) -> str:
    """What the privacy verdicts are, and how large a leak they can see."""
    tests = privacy["tests"]
    return (f"Each privacy verdict is a one-sided test against {privacy['heldout_images']:,} real "
            f"images of patients never trained on (the {privacy['heldout_split']} split), "
            f"corrected together (Holm) so that an honest release fails any of them with "
            f"probability at most {tests['alpha']:g}. {leak_sensitivity(privacy)}")


def versions() -> dict[str, str]:
    names = ("unpersonal", "torch", "numpy", "faiss-cpu", "scikit-learn")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def label_groups(labels: np.ndarray, label_kind: str, names: list[str]
                 ) -> list[tuple[str, np.ndarray]]:
    """The grid rows: (name, which images) per class for binary and multi-class labels; for
    multi-label data one row per label (the images carrying it) and one for those with none."""
    if label_kind == "multilabel":
        rows = [(name, labels[:, column] == 1) for column, name in enumerate(names)]
        return [*rows, ("no label", labels.sum(axis=1) == 0)]
    values = labels.argmax(axis=1) if label_kind == "multiclass" else labels[:, 0]
    return [(names[int(value)] if label_kind == "multiclass" else f"{names[0]} = {int(value)}",
             values == value) for value in np.unique(values)]


def class_grids(train: CanonicalDataset, images: np.ndarray, labels: np.ndarray
                ) -> list[dict[str, Any]]:
    """Real training images above synthetic ones, one row per `label_groups` group."""
    real_groups = label_groups(train.labels, train.label_kind, train.label_names)
    synthetic_groups = dict(label_groups(labels, train.label_kind, train.label_names))
    rows = []
    for name, real_rows in real_groups:
        real = train.images_float()[real_rows][:GRID_COLUMNS]
        fake = images[synthetic_groups[name]][:GRID_COLUMNS]
        if not len(real):
            continue
        grid = np.concatenate([_strip(real, train.resolution), _strip(fake, train.resolution)])
        png, width = _png_b64(grid, scale=max(1, 96 // train.resolution))
        rows.append({"label": name, "png": png, "width": width})
    return rows


def nearest_pairs(embedder_folder: Path, dataset: CanonicalDataset, images: np.ndarray,
                  names: list[str], seed: int) -> list[dict[str, Any]]:
    """A seeded sample of synthetic images, each with its nearest training image (in the space
    of the embedder in `embedder_folder`, cosine) and the distance between them."""
    embedder = load_embedder(embedder_folder)
    features = np.load(embedder_folder / "features.npy")
    train = dataset.subset("train")
    index = NeighbourIndex("cosine").fit(features[dataset.split == "train"])
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), min(PAIRS, len(images)),
                                                        replace=False))
    distances, nearest = index.search(embedder.embed(images[chosen]), k=1)
    train_images = train.images_float()
    scale = max(1, THUMBNAIL // train.resolution)
    return [{"name": names[i], "synthetic": _png_b64(images[i], scale)[0],
             "real": _png_b64(train_images[nearest[j, 0]], scale)[0],
             "distance": float(distances[j, 0])} for j, i in enumerate(chosen)]


def fidelity_rows(fidelity: dict[str, Any]) -> list[tuple[str, str, str]]:
    prdc, reference = fidelity["prdc"], fidelity["prdc_real_test"]
    rows = [("Fréchet distance", f"{fidelity['fd']:.4f}", f"{fidelity['fd_real_test']:.4f}"),
            ("KID", f"{fidelity['kid']['mean']:.5f}", f"{fidelity['kid_real_test']['mean']:.5f}")]
    rows += [(name, f"{prdc[name]:.3f}", f"{reference[name]:.3f}")
             for name in ("precision", "recall", "density", "coverage")]
    rows.append(("Vendi score (diversity)", f"{fidelity['vendi']['synthetic']:.2f}",
                 f"{fidelity['vendi']['real_test']:.2f}"))
    rows.append(("retrieval score (share of training images retrieved)",
                 f"{fidelity['retrieval']['synthetic']:.3f}",
                 f"{fidelity['retrieval']['real_test']:.3f}"))
    return rows


def generation_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    settings = summary["settings"]
    reasons = ", ".join(f"{k} {v}" for k, v in summary["rejections_by_reason"].items())
    return [("generator", settings.get("generator", "EDM-preconditioned diffusion model")),
            ("sources (training images)", f"{summary['sources']:,}"),
            ("accepted", f"{summary['accepted_sources']:,} ({summary['acceptance_rate']:.1%})"),
            ("skipped after every attempt", f"{summary['skipped_sources']:,}"),
            *([("released per label", "; ".join(
                f"{group}: {mix['released']:,} of {mix['sources']:,} sources"
                for group, mix in summary["by_label"].items()))] if "by_label" in summary else []),
            ("candidates drawn", f"{summary['candidates']:,}"),
            ("rejections by check", reasons),
            ("network evaluations per released image", f"{summary['nfe_per_accepted']:.1f}"),
            ("sampler", f"{settings['solver']}, {settings['steps']} steps, guidance "
                        f"{settings['guidance']}"),
            ("selection", f"{settings['mode']}, up to {settings['candidates']} candidates, "
                          f"{settings['selection']}"),
            ("re-ID threshold (calibrated)", f"{settings['reid_threshold']:.4g}")]


def _strip(images: np.ndarray, size: int) -> np.ndarray:
    row = np.zeros((size, GRID_COLUMNS * size), np.float32)
    for column, image in enumerate(images[:GRID_COLUMNS]):
        row[:, column * size:(column + 1) * size] = image
    return row


def _png_b64(pixels: np.ndarray, scale: int = 1) -> tuple[str, int]:
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode(), image.width


def _read_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
