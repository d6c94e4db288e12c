"""`unpersonal audit --release DIR`: any folder of images audited against a run's private data,
with the figures and verdicts of the run's own audit; bad folders refused, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import RELEASE_SETTINGS, assert_refused
from unpersonal.data.canonical import load_canonical


@pytest.fixture(scope="module")
def run(released_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the released run, so that audits of folders land in a run of their own."""
    copy = tmp_path_factory.mktemp("audit-release") / "run"
    shutil.copytree(released_run, copy)
    return copy


def write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True)
    names = [f"img{i:03d}.png" for i in range(len(images))]
    for name, pixels in zip(names, images):
        Image.fromarray(pixels).save(folder / name)
    if labels is not None:
        rows = ["path,finding", *(f"{name},{int(v)}" for name, v in zip(names, labels))]
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_the_runs_own_release_gets_the_runs_own_figures(cli, run: Path) -> None:
    result = cli("audit", "--out", run, "--release", run / "generate" / "synthetic",
                 *RELEASE_SETTINGS)
    assert result.code == 0, result
    audited = json.loads((run / "audit-release" / "synthetic" / "privacy.json").read_text())
    own = json.loads((run / "audit" / "privacy.json").read_text())
    assert audited["tests"] == own["tests"] and audited["reid_rate"] == own["reid_rate"]
    assert audited["release"]["labelled"] and audited["release"]["notes"] == []
    report = (run / "audit-release" / "synthetic" / "AUDIT.md").read_text()
    verdict = "passes every test" if own["tests"]["passed"] else "FAILS"
    assert verdict in report and "| re-identified" in report


def test_the_exported_release_is_read_in_its_layout(cli, run: Path) -> None:
    """export/ keeps images in images/ and lists them, from the folder, in metadata.csv."""
    result = cli("audit", "--out", run, "--release", run / "export", "--to", run / "exported",
                 *RELEASE_SETTINGS)
    assert result.code == 0, result
    audited = json.loads((run / "exported" / "privacy.json").read_text())
    own = json.loads((run / "audit" / "privacy.json").read_text())
    assert audited["tests"] == own["tests"] and audited["release"]["labelled"]


def test_training_images_at_another_size_fail_the_audit(cli, run: Path, tmp_path: Path) -> None:
    """A folder of another tool's 'synthetic' images that are the training images, upscaled
    and without labels: resized back as prepare would, with a note, and failed."""
    train = load_canonical(run / "prepare").subset("train")
    big = np.stack([np.asarray(Image.fromarray(image).resize((24, 24), Image.Resampling.LANCZOS))
                    for image in train.images])
    folder = write_pngs(tmp_path / "leaky", big)
    (folder / "README.txt").write_text("not an image, ignored")
    result = cli("audit", "--out", run, "--release", folder, "--to", tmp_path / "out",
                 *RELEASE_SETTINGS)
    assert result.code == 0, result
    assert "resized to 16 px" in result.stderr  # the console prints to stderr
    audited = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert not audited["tests"]["passed"] and not audited["release"]["labelled"]
    assert audited["tests"]["by_figure"]["dcr_pixel_q01"]["rejected"]
    assert "FAILS" in (tmp_path / "out" / "AUDIT.md").read_text()


def _bad_folders(root: Path, train: np.ndarray) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Each bad folder and the parts its one-line error must name."""
    empty = root / "empty"
    empty.mkdir()
    not_image = write_pngs(root / "not-image", train[:3])
    (not_image / "img001.png").write_bytes(b"this is text")
    wrong_columns = write_pngs(root / "wrong-columns", train[:3], np.array([0, 1, 0]))
    (wrong_columns / "labels.csv").write_text("file,finding\nimg000.png,0\n")
    missing = write_pngs(root / "missing", train[:3], np.array([0, 1, 0]))
    (missing / "img002.png").unlink()
    bad_label = write_pngs(root / "bad-label", train[:3], np.array([0, 1, 0]))
    (bad_label / "labels.csv").write_text("path,finding\nimg000.png,0\nimg001.png,yes\n")
    outside = write_pngs(root / "outside", train[:1], np.array([0]))
    (outside / "labels.csv").write_text("path,finding\n../not-image/img000.png,0\n")
    frames = root / "frames"
    frames.mkdir()
    first, second = (Image.fromarray(image) for image in train[:2])
    first.save(frames / "stack.tif", save_all=True, append_images=[second])
    return {"empty": (empty, ("no images", "empty")),
            "not-image": (not_image, ("img001.png", "not an image")),
            "wrong-columns": (wrong_columns, ("labels.csv", "columns", "['path', 'finding']")),
            "missing": (missing, ("line 4", "img002.png", "is not a file")),
            "bad-label": (bad_label, ("line 3", "finding", "'yes'")),
            "outside": (outside, ("line 2", "../not-image/img000.png")),
            "frames": (frames, ("stack.tif", "2 frames")),
            "no-such-folder": (root / "nowhere", ("--release", "no such folder"))}


def test_bad_folders_are_refused_naming_the_file_with_nothing_written(
        cli, run: Path, tmp_path: Path) -> None:
    train = load_canonical(run / "prepare").subset("train").images
    before = sorted(path.name for path in run.iterdir())
    for name, (folder, parts) in _bad_folders(tmp_path, train).items():
        out = tmp_path / f"out-{name}"
        assert_refused(cli("audit", "--out", run, "--release", folder, "--to", out), *parts)
        assert not out.exists(), name
    assert sorted(path.name for path in run.iterdir()) == before
    assert_refused(cli("audit", "--out", run, "--to", tmp_path / "x"), "--to", "--release")
