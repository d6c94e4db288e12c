"""`prepare` on a folder of images with a label CSV, including every bad-input case."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unpersonal.config import load_config
from unpersonal.data.prepare import build_canonical
from unpersonal.errors import UserError
from tests.conftest import write_image_folder


def _prepare(source: Path, *overrides: str):
    config = load_config("cpu", None, ["data.resolution=16", *overrides], data_source=source)
    return build_canonical(config.data, config.phantoms, config.seed)


def test_folder_with_csv_reads_labels_patients_and_pixels(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds")
    data = _prepare(folder)
    assert len(data) == 12 and data.label_names == ["finding"] and data.label_kind == "binary"
    assert data.patient_id[:4].tolist() == ["P00", "P00", "P01", "P01"]
    expected = np.asarray(Image.open(folder / "img" / "003.png"))
    assert np.array_equal(data.images[3], expected)
    assert data.ref[3] == "img/003.png (CSV line 5)"
    assert _prepare(folder / "labels.csv").images.shape == data.images.shape  # CSV given directly


def test_multilabel_columns_and_given_split(tmp_path: Path) -> None:
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    rows = [f"img/{i:03d}.png,{i % 2},{(i // 2) % 2},P{i:02d},{splits[i]}" for i in range(12)]
    folder = write_image_folder(tmp_path / "ds", header="path,a,b,patient_id,split", rows=rows)
    data = _prepare(folder)
    assert data.label_kind == "multilabel" and data.label_names == ["a", "b"]
    assert data.labels[:4].tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert (data.split == "train").sum() == 8 and (data.split == "test").sum() == 2


def test_sixteen_bit_png_is_kept_at_sixteen_bits(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds", count=6)  # 3 patients: one per split
    deep = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 250)
    Image.fromarray(deep).save(folder / "img" / "000.png")
    data = _prepare(folder)
    assert data.bit_depth == 16 and np.array_equal(data.images[0], deep)
    assert data.images[1].max() > 255  # 8-bit images are scaled into the 16-bit range


def test_mixed_colour_and_grey_images_are_converted_with_a_note(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds", count=6)
    grey = np.asarray(Image.open(folder / "img" / "002.png"))
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / "img" / "002.png")
    data = _prepare(folder)
    assert np.array_equal(data.images[2], grey)
    assert data.meta["notes"][0].startswith("1 colour and 5 grey images: colour converted to grey "
                                            "(first: img/002.png (CSV line 4))")


def test_small_images_are_upsampled_with_a_warning(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds", count=6, size=8)
    data = _prepare(folder)
    assert data.images.shape == (6, 16, 16)
    assert "6 images are smaller than 16 px" in data.meta["warnings"][0]


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_non_square_images_follow_the_fit_option(tmp_path: Path, fit: str) -> None:
    folder = write_image_folder(tmp_path / "ds", count=6)
    wide = np.zeros((16, 32), np.uint8)
    wide[:, 8:24] = 200  # a bright centre square
    Image.fromarray(wide).save(folder / "img" / "000.png")
    image = _prepare(folder, f"data.fit={fit}").images[0].astype(int)
    if fit == "crop":
        assert image.min() > 190  # only the centre remains
    elif fit == "pad":
        assert image[:3].max() < 5 and image[8, 8] > 190  # black bars above and below
    else:
        assert image[:, 1].max() < 20 and image[:, 8].min() > 190  # squeezed sideways


def _expect(folder: Path, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        _prepare(folder)


def test_truncated_image_is_named(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds", size=64)
    target = folder / "img" / "004.png"
    target.write_bytes(target.read_bytes()[:-200])
    _expect(folder, r"img/004.png \(CSV line 6\): cannot decode image")


def test_non_image_file_is_named(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds")
    (folder / "img" / "005.png").write_text("not an image")
    _expect(folder, r"img/005.png \(CSV line 7\): not a readable image")


def test_missing_label_column_is_refused(tmp_path: Path) -> None:
    rows = [f"img/{i:03d}.png,P{i:02d}" for i in range(12)]
    _expect(write_image_folder(tmp_path / "ds", header="path,patient_id", rows=rows),
            "labels.csv has no label column")
    with pytest.raises(UserError, match="has no label column 'pneumonia'"):
        _prepare(write_image_folder(tmp_path / "ds2"), "data.label_columns=[pneumonia]")


def test_non_numeric_label_names_line_and_column(tmp_path: Path) -> None:
    rows = [f"img/{i:03d}.png,{'yes' if i == 3 else i % 2},P{i:02d}" for i in range(12)]
    _expect(write_image_folder(tmp_path / "ds", rows=rows),
            "labels.csv line 5: label column 'finding' is 'yes', not a number")


def test_path_escaping_the_dataset_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(b"")
    rows = ["img/000.png,0,P00", "../secret.png,1,P01"]
    _expect(write_image_folder(tmp_path / "ds", rows=rows),
            r"labels.csv line 3: path '../secret.png' escapes the dataset folder")
    absolute = [f"{tmp_path / 'secret.png'},1,P01"]
    _expect(write_image_folder(tmp_path / "ds2", rows=absolute), "escapes the dataset folder")


def test_missing_file_empty_csv_and_no_path_column(tmp_path: Path) -> None:
    _expect(write_image_folder(tmp_path / "a", rows=["img/999.png,0,P00"]),
            r"labels.csv line 2: file 'img/999.png' does not exist")
    _expect(write_image_folder(tmp_path / "b", rows=[]), "lists no images: the dataset is empty")
    _expect(write_image_folder(tmp_path / "c", header="file,finding,patient_id"),
            "has no 'path' column")


def test_partial_split_and_unknown_split_are_refused(tmp_path: Path) -> None:
    rows = [f"img/{i:03d}.png,0,P{i:02d},{'train' if i else ''}" for i in range(4)]
    _expect(write_image_folder(tmp_path / "a", header="path,finding,patient_id,split", rows=rows),
            "labels.csv line 2: empty split while other rows have one")
    rows = [f"img/{i:03d}.png,0,P{i:02d},holdout" for i in range(4)]
    _expect(write_image_folder(tmp_path / "b", header="path,finding,patient_id,split", rows=rows),
            "line 2: split 'holdout' is not train, val or test")


def test_folder_without_or_with_several_csvs(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "ds")
    (folder / "labels.csv").rename(folder / "labels.txt")
    _expect(folder, "has no label CSV")
    (folder / "a.csv").write_text("path\n")
    (folder / "b.csv").write_text("path\n")
    _expect(folder, r"several CSV files \(a.csv, b.csv\)")
