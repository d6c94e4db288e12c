"""Bad input a new user brings to `prepare` and `demo-data`, through the command line.

Each case must end as one line `error: ...` naming the file, row or option, exit code 2, and
nothing written: no run directory, no demo file, nothing left beside the target.
"""

import errno
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_refused, random_images, write_flat_npz, write_image_folder

SMALL_DEMO = ("--set", "phantoms.n_patients=12", "--set", "data.resolution=16")


def _prepare_refused(cli, data: Path, tmp_path: Path, *parts: str, options: tuple = ()) -> None:
    """`prepare` on `data` is refused and leaves no run directory."""
    run = tmp_path / "run"
    assert_refused(cli("prepare", "--data", data, "--out", run, "--set", "data.resolution=16",
                        *options), *parts)
    assert not run.exists(), "a refused prepare must leave no run directory"


def _listing(folder: Path) -> list[tuple[str, int]]:
    """Every path under `folder` with its size, to show that nothing changed."""
    return sorted((str(path.relative_to(folder)), path.stat().st_size if path.is_file() else -1)
                  for path in folder.rglob("*"))


# 1. labels as text


def test_text_labels_in_npz_are_refused_naming_file_row_and_array(cli, tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz", label=np.array(["normal", "pneumonia"] * 12))
    _prepare_refused(cli, path, tmp_path, "d.npz row 0: array 'label' holds the text 'normal'",
                     "labels must be numbers")


def test_text_that_reads_as_numbers_is_still_a_label(cli, tmp_path: Path) -> None:
    as_text = write_flat_npz(tmp_path / "t.npz", label=np.array(["0", "1"] * 12))
    as_ints = write_flat_npz(tmp_path / "i.npz")
    for name, path in (("t", as_text), ("i", as_ints)):
        assert cli("prepare", "--data", path, "--out", tmp_path / name, "--set",
                   "data.resolution=16").code == 0
    text_labels = np.load(tmp_path / "t" / "prepare" / "arrays.npz")["labels"]
    assert np.array_equal(text_labels, np.load(tmp_path / "i" / "prepare" / "arrays.npz")["labels"])


# 2. decompression bombs


def test_image_over_the_decompression_bomb_limit_is_named(cli, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_image_folder(tmp_path / "ds")
    Image.fromarray(random_images(1, 64)[0]).save(folder / "img" / "005.png")  # 4,096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over twice this
    _prepare_refused(cli, folder, tmp_path, "img/005.png (CSV line 7): Image size (4096 pixels)",
                     "decompression bomb")


# 3. a missing patient ID in a float array


def test_nan_patient_id_is_refused_naming_the_row(cli, tmp_path: Path) -> None:
    patients = (np.arange(24) // 2).astype(np.float64)
    patients[5] = np.nan  # how pandas writes a missing ID into a float column
    path = write_flat_npz(tmp_path / "d.npz", patients=patients)
    _prepare_refused(cli, path, tmp_path, "1 of 24 images have no patient ID (first: d.npz row 5)")


# 4a. no validation or test images


def test_given_split_without_val_and_test_is_refused(cli, tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz", splits=["train"] * 24)
    _prepare_refused(cli, path, tmp_path, "d.npz: the split given with the data has no val and "
                     "test images (24 in train)", "every later stage needs train, val and test")


def test_dataset_of_one_patient_is_refused(cli, tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz", patients=["P1"] * 24)
    _prepare_refused(cli, path, tmp_path, "d.npz: the patient-level split left val and test "
                     "empty (24 in train, 1 patient to share out)", "more patients")


def test_split_fractions_without_val_and_test_are_refused(cli, tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz")
    _prepare_refused(cli, path, tmp_path, "data.split_fractions [1.0, 0.0, 0.0] gives val and "
                     "test no share", options=("--set", "data.split_fractions=[1,0,0]"))


def test_small_dataset_still_gets_every_split(cli, tmp_path: Path) -> None:
    """Ten phantom patients in four strata: stratum by stratum, all would go to train or val."""
    run = tmp_path / "run"
    assert cli("prepare", "--out", run, "--set", "phantoms.n_patients=10", "--set",
               "data.resolution=16", "--set", "seed=0").code == 0
    arrays = np.load(run / "prepare" / "arrays.npz")
    split, patients = arrays["split"], arrays["patient_id"]
    assert {"train", "val", "test"} <= set(split.tolist())
    for patient in set(patients.tolist()):  # identity probes are training patients' images
        assert len(set(split[patients == patient].tolist()) - {"probe"}) == 1


# 4b. a stray class number


def test_stray_class_label_is_refused_naming_the_row_and_value(cli, tmp_path: Path) -> None:
    labels = np.arange(24) % 2
    labels[7] = 1000
    path = write_flat_npz(tmp_path / "d.npz", label=labels)
    _prepare_refused(cli, path, tmp_path, "d.npz row 7: class label 1000, but no image has "
                     "classes 2..999", "0..K-1")


# 4c. a config section that is not a mapping


@pytest.mark.parametrize("section", ["foo", "[1, 2]"])
def test_config_section_that_is_not_a_mapping_is_refused(cli, tmp_path: Path, section: str) -> None:
    config = tmp_path / "my.yaml"
    config.write_text(f"data: {section}\n")
    _prepare_refused(cli, write_flat_npz(tmp_path / "d.npz"), tmp_path,
                     f"config file {config}: section 'data' must be a mapping",
                     options=("--config", config))


# 4d. several images in one file


@pytest.mark.parametrize("name", ["multi.tif", "anim.gif"])
def test_multi_frame_file_is_refused_naming_it(cli, tmp_path: Path, name: str) -> None:
    folder = write_image_folder(tmp_path / "ds")
    frames = [Image.fromarray(pixels) for pixels in random_images(3, seed=1)]
    frames[0].save(folder / "img" / name, save_all=True, append_images=frames[1:])
    with open(folder / "labels.csv", "a") as csv:
        csv.write(f"img/{name},1,P99\n")
    _prepare_refused(cli, folder, tmp_path, f"img/{name} (CSV line 14): holds 3 frames",
                     "one image per file")


# 5. clearer messages


def test_npz_that_is_not_a_zip_archive_says_so(cli, tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_text("images,label\n")
    _prepare_refused(cli, tmp_path / "d.npz", tmp_path, "d.npz: not a valid .npz file",
                     "zip archive")
    np.save(tmp_path / "one.npy", random_images(4))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    _prepare_refused(cli, tmp_path / "one.npz", tmp_path, "one.npz: a single .npy array")


def test_csv_path_naming_a_folder_says_so(cli, tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds")
    (folder / "img" / "sub").mkdir()
    with open(folder / "labels.csv", "a") as csv:
        csv.write("img/sub,1,P99\n")
    _prepare_refused(cli, folder, tmp_path, "labels.csv line 14: path 'img/sub' is a folder, "
                     "not an image file")


def test_flat_images_array_gives_its_shape(cli, tmp_path: Path) -> None:
    path = write_flat_npz(tmp_path / "d.npz", images=random_images(24).reshape(-1))
    _prepare_refused(cli, path, tmp_path, "d.npz: array 'images' has shape (6144,); images must "
                     "be [N, H, W] (or [N, H, W, C])")


# 6. demo-data targets


@pytest.mark.parametrize("layout", ["npz", "folder"])
def test_demo_data_refuses_an_existing_target(cli, tmp_path: Path, layout: str) -> None:
    (tmp_path / "mine.npz").write_bytes(b"the user's own file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    before = _listing(tmp_path)
    for target, kind in ((tmp_path / "mine.npz", "file"), (tmp_path / "mine", "folder")):
        assert_refused(cli("demo-data", "--out", target, "--layout", layout, *SMALL_DEMO),
                        f"--out {target}: a {kind} of that name already exists")
    assert _listing(tmp_path) == before
    assert (tmp_path / "mine.npz").read_bytes() == b"the user's own file"


@pytest.mark.parametrize("layout", ["npz", "folder"])
def test_demo_data_refuses_a_target_under_a_file(cli, tmp_path: Path, layout: str) -> None:
    (tmp_path / "somefile.txt").write_text("x")
    before = _listing(tmp_path)
    for target in (tmp_path / "somefile.txt" / "out.npz", tmp_path / "somefile.txt" / "a" / "b"):
        assert_refused(cli("demo-data", "--out", target, "--layout", layout, *SMALL_DEMO),
                        f"--out {target}: {tmp_path / 'somefile.txt'} is a file, not a folder")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("layout", ["npz", "folder"])
def test_failed_demo_data_leaves_nothing_behind(cli, tmp_path: Path, layout: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk halfway through: no partial build, and no folder made for the target."""
    def disk_full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if layout == "npz":
        monkeypatch.setattr("os.fsync", disk_full)  # after the bytes went into the file
    else:
        real_save, saved = Image.Image.save, []

        def save_three(image, *args, **kwargs) -> None:
            if len(saved) == 3:
                disk_full()
            saved.append(real_save(image, *args, **kwargs))

        monkeypatch.setattr(Image.Image, "save", save_three)
    target = tmp_path / "new" / "deeper" / "demo"
    assert_refused(cli("demo-data", "--out", target, "--layout", layout, *SMALL_DEMO),
                    f"--out {target}: cannot write there (No space left on device)")
    assert _listing(tmp_path) == []
