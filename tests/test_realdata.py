"""`prepare` on the real Kermany chest X-rays (skipped when ../shared/data is absent)."""

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.realdata


def test_kermany_64_prepares_with_its_patient_wise_split(cli, shared_data: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "k64"
    result = cli("prepare", "--data", shared_data / "kermany_cxr_64.npz", "--out", run)
    assert result.code == 0, result.stderr
    meta = json.loads((run / "prepare" / "dataset.json").read_text())
    counts = {name: meta["summary"]["splits"][name]["images"] for name in ("train", "val", "test")}
    probes = meta["summary"]["identity_probes"]
    # The official split, 5% of its training images held back as identity probes: one image
    # each of training patients with three or more (311 such patients), none with a twin.
    assert counts == {"train": 4699 - probes["images"], "val": 533, "test": 624}
    assert 220 <= probes["images"] == probes["patients"] <= 235
    assert meta["summary"]["shared_patients"] == 0
    assert (meta["resolution"], meta["label_kind"]) == (32, "binary")  # the cpu preset
    assert "patients shared between splits: 0" in result.stderr


def test_kermany_with_a_patient_moved_into_two_splits_exits_2(cli, shared_data: Path,
                                                              tmp_path: Path) -> None:
    arrays = dict(np.load(shared_data / "kermany_cxr_64.npz"))
    patient = "bacteria_person1323"
    rows = np.flatnonzero(arrays["patient_id"] == patient)
    assert len(rows) >= 2 and len(set(arrays["split"][rows])) == 1
    arrays["split"] = arrays["split"].copy()
    arrays["split"][rows[-1]] = "test" if arrays["split"][rows[0]] != "test" else "train"
    np.savez(tmp_path / "leak.npz", **arrays)
    run = tmp_path / "leak"
    result = cli("prepare", "--data", tmp_path / "leak.npz", "--out", run)
    assert result.code == 2 and f"patient '{patient}' is in two splits" in result.stderr
    assert not run.exists()


def test_kermany_128_resized_to_64_is_close_to_the_64_file(cli, shared_data: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "k128"
    assert cli("prepare", "--data", shared_data / "kermany_cxr_128.npz", "--out", run,
               "--set", "data.resolution=64").code == 0
    ours = np.load(run / "prepare" / "arrays.npz")["images"][:200].astype(float)
    theirs = np.load(shared_data / "kermany_cxr_64.npz")["images"][:200].astype(float)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).mean() < 4  # two Lanczos paths to 64 px agree to a few grey levels
