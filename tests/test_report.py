"""The report in a real browser, the export's privacy checks, and `unpersonal run` end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import GENERATE_SETTINGS, RELEASE_SETTINGS
from unpersonal.data.canonical import load_canonical


def _chromium() -> str:
    """The headless browser, installed (Debian `chromium`) when missing and possible."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                       capture_output=True, timeout=900)
        if found := shutil.which("chromium"):
            return found
    pytest.skip("headless Chromium is not installed and could not be installed with apt-get "
                "(install the Debian package `chromium` to run this test)")


def test_report_loads_every_image_without_console_errors(released_run: Path,
                                                         tmp_path: Path) -> None:
    page = released_run / "report" / "index.html"
    html = page.read_text()
    expected = len(re.findall(r"<img\b", html))
    assert expected >= 2 + 12 + 2  # class grids, nearest pairs, the two plots
    browser = _chromium()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
              "--v=0", "--virtual-time-budget=5000", "--window-size=1200,2400"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert f'data-images-loaded="{expected}/{expected}"' in dom.stdout, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120)
    assert Image.open(shot).size == (1200, 2400)


def test_export_carries_no_patient_id_source_reference_or_real_image(released_run: Path) -> None:
    export = released_run / "export"
    dataset = load_canonical(released_run / "prepare")
    secrets = [str(v).encode() for v in np.unique(dataset.patient_id)] + [
        str(v).encode() for v in np.unique(dataset.ref)]
    secrets.append(str(dataset.meta.get("source", "unpersonal-no-source")).encode())
    files = [path for path in export.rglob("*") if path.is_file()]
    released_names = sorted(path.name for path in (released_run / "generate" / "synthetic").glob(
        "*.png"))
    # An allow-list: these files and nothing else (no log, no cache, no stray real image).
    assert sorted(str(path.relative_to(export)) for path in files) == sorted(
        ["metadata.csv", "README.md", "datasheet.json", "croissant.json",
         *(f"images/{name}" for name in released_names)])
    for path in files:
        content = path.read_bytes()
        leaked = [secret for secret in secrets if secret and secret in content]
        assert not leaked, (path.name, leaked[:3])
    real = {image.tobytes() for image in dataset.images}
    images = sorted((export / "images").glob("*.png"))
    assert images and not [p for p in images if np.asarray(Image.open(p)).tobytes() in real]
    released = released_run / "generate" / "synthetic"
    for path in images:  # exactly the accepted images, untouched
        assert path.read_bytes() == (released / path.name).read_bytes()
    sheet = json.loads((export / "datasheet.json").read_text())
    assert sheet["what"]["images"] == len(images)
    assert {v["figure"] for v in sheet["privacy"]["verdicts"]} >= {
        "planted near-copies of training images caught by the audit"}


def _card_code(card: str, folder: Path) -> list[str]:
    """The Python blocks of a dataset card, reading `folder`."""
    from unpersonal.report.card import FOLDER_PLACEHOLDER

    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return [block.replace(FOLDER_PLACEHOLDER, str(folder)) for block in blocks]


def test_the_export_loads_as_its_card_says(released_run: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way the card shows (Hugging Face imagefolder, MONAI, Croissant) gives the released
    images with their labels, and the card carries the Hub's metadata header."""
    pytest.importorskip("datasets")
    pytest.importorskip("mlcroissant")
    import yaml

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cache outside the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    export = released_run / "export"
    card = (export / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["task_categories"] == ["image-classification"] and "synthetic" in header["tags"]
    assert "# Datasheet" in card and "## Privacy audit" in card
    with open(export / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = {row["file_name"]: int(row["finding"]) for row in rows}
    pixels = {row["file_name"]: np.asarray(Image.open(export / row["file_name"]))
              for row in rows}
    hub, monai, croissant = _card_code(card, export)
    space: dict = {}
    exec(hub, space)
    release = space["release"]
    assert len(release) == len(rows) and release.column_names == ["image", "finding"]
    loaded = sorted((np.asarray(item["image"]).tobytes(), item["finding"]) for item in release)
    assert loaded == sorted((pixels[name].tobytes(), label) for name, label in expected.items())
    exec(monai, space)
    release, first = space["release"], rows[0]["file_name"]
    assert len(release) == len(rows) and tuple(space["image"].shape) == (1, *pixels[first].shape)
    assert space["label"] == [expected[first]]
    image = np.asarray(space["image"])[0]
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    exec(croissant, space)
    assert space["label"] == expected[space["record"]["samples/file_name"].decode()]
    records = space["mlcroissant"].Dataset(jsonld=str(export / "croissant.json")).records(
        "samples")  # a fresh iterator: the card's is part-read
    by_name = {r["samples/file_name"].decode(): r for r in records}
    assert sorted(by_name) == sorted(expected)
    for name, record in by_name.items():  # mlcroissant hands images over as RGB
        assert record["samples/finding"] == expected[name]
        assert np.array_equal(np.asarray(record["samples/image"].convert("L")), pixels[name])


def _tampered(released_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(released_run, run)
    shutil.rmtree(run / "export")
    return run


def _export(run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unpersonal", "export", "--out", str(run)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_export_refuses_a_real_image_slipped_into_the_set(released_run: Path,
                                                          tmp_path: Path) -> None:
    run = _tampered(released_run, tmp_path)
    synthetic = run / "generate" / "synthetic"
    with open(synthetic / "labels.csv", newline="") as handle:
        first = next(row for row in csv.DictReader(handle))
    real = load_canonical(run / "prepare").subset("train").images[0]
    Image.fromarray(real).save(synthetic / first["path"])  # an accepted name, a real image
    result = _export(run)
    assert result.returncode == 2, result.stderr
    assert "export refused" in result.stderr and first["path"] in result.stderr
    assert not (run / "export").exists()


def _first_accepted(synthetic: Path) -> str:
    with open(synthetic / "labels.csv", newline="") as handle:
        return next(row for row in csv.DictReader(handle))["path"]


def test_export_refuses_a_held_out_image_by_its_pixels_alone(released_run: Path,
                                                              tmp_path: Path) -> None:
    """A test-split image the filter lets through (it is no training patient's): only the
    pixel-hash check against every real input image stops it."""
    from unpersonal.config import load_config
    from unpersonal.rundir import RunDir
    from unpersonal.stages.calibrate import load_filter

    run = _tampered(released_run, tmp_path)
    test = load_canonical(run / "prepare").subset("test")
    config = load_config(config_file=run / "config.yaml")
    passing = ~load_filter(config, RunDir(run)).check(test.images_float()).rejected
    assert passing.any()  # else this test could not tell the two checks apart
    synthetic = run / "generate" / "synthetic"
    name = _first_accepted(synthetic)
    Image.fromarray(test.images[int(np.flatnonzero(passing)[0])]).save(synthetic / name)
    result = _export(run)
    assert result.returncode == 2 and "identical to a real input image" in result.stderr, (
        result.stderr)
    assert name in result.stderr and not (run / "export").exists()


def test_export_refuses_a_near_copy_by_the_filter_alone(released_run: Path,
                                                        tmp_path: Path) -> None:
    """A training image with one pixel one grey level off: no real image has its bytes, so only
    the filter, checked again, stops it."""
    run = _tampered(released_run, tmp_path)
    near = load_canonical(run / "prepare").subset("train").images[0].copy()
    near[0, 0] = near[0, 0] + 1 if near[0, 0] < 255 else 254
    synthetic = run / "generate" / "synthetic"
    name = _first_accepted(synthetic)
    Image.fromarray(near).save(synthetic / name)
    result = _export(run)
    assert result.returncode == 2 and "fails the privacy filter" in result.stderr, result.stderr
    assert name in result.stderr and not (run / "export").exists()


def test_export_refuses_an_image_generate_did_not_accept(released_run: Path,
                                                          tmp_path: Path) -> None:
    run = _tampered(released_run, tmp_path)
    synthetic = run / "generate" / "synthetic"
    shutil.copy(next(synthetic.glob("*.png")), synthetic / "extra.png")
    with open(synthetic / "labels.csv", "a") as handle:
        handle.write("extra.png,0\n")
    result = _export(run)
    assert result.returncode == 2 and "extra.png" in result.stderr, result.stderr
    assert not (run / "export").exists()


def test_identifier_check_finds_ids_as_tokens_and_in_file_names() -> None:
    from unpersonal.data.canonical import CanonicalDataset
    from unpersonal.errors import UserError
    from unpersonal.report.export import check_no_identifiers

    dataset = CanonicalDataset(
        images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros((3, 1), np.uint8),
        patient_id=np.array(["patient-0007", "17", "17"]), split=np.array(["train"] * 3),
        ref=np.array(["scans/a.png", "scans/b.png", "scans/c.png"]), label_names=["finding"],
        label_kind="binary", bit_depth=8)
    clean = {"labels.csv": b"path,finding\nsyn-000000.png,0\n",
             "DATASHEET.md": b"17 images; patient-00071 is another token"}
    check_no_identifiers(clean, dataset)  # "17" as a count, a longer token: not an ID
    for files in ({"DATASHEET.md": b"made from patient-0007's films"},
                  {"datasheet.json": b'{"source": "scans/b.png"}'},
                  {"labels.csv": b"path,finding\n17.png,1\n"},
                  {"images/patient-0007.png": b""}):
        with pytest.raises(UserError, match="export refused"):
            check_no_identifiers(files, dataset)


def test_identifier_check_finds_one_id_among_thousands() -> None:
    """A real dataset has about ten thousand IDs and references; each must still be found,
    including one that begins with another (longest first)."""
    from unpersonal.data.canonical import CanonicalDataset
    from unpersonal.errors import UserError
    from unpersonal.report.export import check_no_identifiers

    count = 5000
    ids = np.array(["PAT00000", "PAT00000-b"] + [f"PAT{i:05d}" for i in range(2, count)])
    dataset = CanonicalDataset(
        images=np.zeros((count, 2, 2), np.uint8), labels=np.zeros((count, 1), np.uint8),
        patient_id=ids, split=np.array(["train"] * count),
        ref=np.array([f"scan_{i}.png" for i in range(count)]), label_names=["finding"],
        label_kind="binary", bit_depth=8)
    png = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(png, format="PNG")
    names = {f"images/syn-{i:06d}.png": png.getvalue() for i in range(200)}
    check_no_identifiers({**names, "DATASHEET.md": b"PAT050000 scan_99999.png"}, dataset)
    for leak in (b"see PAT04999.", b"from PAT00000-b", b"scan_4321.png"):
        with pytest.raises(UserError, match="export refused"):
            check_no_identifiers({**names, "DATASHEET.md": leak}, dataset)


def _unpersonal_run(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "unpersonal", "run", "--out", str(out),
                             *GENERATE_SETTINGS, *RELEASE_SETTINGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_run_killed_at_a_random_point_then_rerun_gives_the_same_export(tmp_path: Path) -> None:
    started = time.monotonic()
    whole = _unpersonal_run(tmp_path / "whole")
    _, err = whole.communicate(timeout=900)
    assert whole.returncode == 0, err[-3000:]
    assert "report (internal" in err and "release (shareable)" in err
    duration = time.monotonic() - started
    delay = random.Random(os.getpid()).uniform(0.1, 0.9) * duration
    killed = _unpersonal_run(tmp_path / "killed")
    started = time.monotonic()
    while killed.poll() is None and time.monotonic() - started < delay:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _unpersonal_run(tmp_path / "killed")
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert _tree(tmp_path / "killed" / "export") == _tree(tmp_path / "whole" / "export")


def test_the_datasheet_says_one_seed_or_a_mean_over_seeds(released_run: Path) -> None:
    """The demo trains one classifier per set: its datasheet says so, not "mean over 1"."""
    from unpersonal.report.export import datasheet_markdown

    sheet = json.loads((released_run / "export" / "datasheet.json").read_text())
    assert "mean over 2 training seeds" in datasheet_markdown(sheet)
    sheet["utility"]["classifier_seeds"] = 1
    text = datasheet_markdown(sheet)
    assert "(real test images, one training seed)" in text and "mean over" not in text
