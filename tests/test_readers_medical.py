"""The DICOM and NIfTI readers, on small files the tests write themselves."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (UID, ExplicitVRLittleEndian, JPEGLSLossless,
                         SecondaryCaptureImageStorage, generate_uid)

from unpersonal.config import DataConfig
from unpersonal.data.readers import nifti as nifti_module
from unpersonal.data.readers.dicom import read_dicom_folder
from unpersonal.data.readers.nifti import read_nifti_folder
from unpersonal.errors import UserError

# ---------------------------------------------------------------------------------------- helpers


def write_csv(folder: Path, rows: list[dict[str, object]]) -> Path:
    path = folder / "labels.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, patient_id: str = "",
                rescale: tuple[float, float] | None = None,
                window: tuple[list[float], list[float]] | None = None,
                truncate: bool = False, transfer_syntax: UID = ExplicitVRLittleEndian,
                extra: Dataset | None = None) -> Path:
    """A minimal valid DICOM file: grey [H, W] or [frames, H, W], or RGB [H, W, 3] uint8."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    colour = photometric == "RGB"
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    grey_frames = pixels.ndim == 3 and not colour
    if grey_frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[1:3] if grey_frames else pixels.shape[:2]
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if extra is not None:
        ds.update(extra)
    data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    if transfer_syntax == JPEGLSLossless:
        ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
    else:
        ds.PixelData = data[: len(data) // 2] if truncate else data
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_folder(tmp_path: Path, files: dict[str, dict[str, object]],
                 csv_patients: dict[str, str] | None = None) -> Path:
    """Write DICOM files (name -> write_dicom keywords) and a CSV listing them, label 1."""
    for name, options in files.items():
        write_dicom(tmp_path / name, **options)  # type: ignore[arg-type]
    rows: list[dict[str, object]] = []
    for name in files:
        row: dict[str, object] = {"path": name, "finding": 1}
        if csv_patients is not None:
            row["patient_id"] = csv_patients.get(name, "")
        rows.append(row)
    write_csv(tmp_path, rows)
    return tmp_path


def ramp(dtype: str, high: int, shape: tuple[int, ...] = (8, 8)) -> np.ndarray:
    return np.linspace(0, high, int(np.prod(shape))).round().astype(dtype).reshape(shape)


def constant_with(value: int, at: int, dtype: str = "uint16") -> np.ndarray:
    """An 8x8 image of zeros with `value` at flat position `at`."""
    pixels = np.zeros((8, 8), dtype)
    pixels.flat[at] = value
    return pixels


# ------------------------------------------------------------------------------------------ DICOM


def test_dicom_8_bit_pixels_map_by_window(tmp_path: Path) -> None:
    pixels = ramp("uint8", 255)
    folder = dicom_folder(tmp_path, {"a.dcm": {"pixels": pixels}})
    source = read_dicom_folder(folder, DataConfig(window=(127.5, 255.0)))
    assert source.bit_depth == 8
    assert len(source) == 1 and source.refs == ["a.dcm (CSV line 2)"]
    image = source.load(0)
    assert image.dtype == np.float32 and image.shape == (8, 8)
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-6)
    assert source.description == "1 DICOM images listed in labels.csv"


def test_dicom_16_bit_sets_bit_depth_and_keeps_precision(tmp_path: Path) -> None:
    pixels = ramp("uint16", 4095)
    folder = dicom_folder(tmp_path, {"a.dcm": {"pixels": ramp("uint8", 255)},
                                     "b.dcm": {"pixels": pixels, "bits_stored": 12}})
    source = read_dicom_folder(folder, DataConfig(window=(2047.5, 4095.0)))
    assert source.bit_depth == 16
    np.testing.assert_allclose(source.load(1), pixels / 4095.0, atol=1e-6)
    assert len(np.unique(source.load(1))) == 64  # not squeezed through 8 bits


def test_dicom_without_window_uses_percentile_range(tmp_path: Path) -> None:
    folder = dicom_folder(tmp_path, {"a.dcm": {"pixels": ramp("uint16", 1000, (20, 20))}})
    image = read_dicom_folder(folder, DataConfig()).load(0)
    assert image.min() == 0.0 and image.max() == 1.0
    assert (image == 0.0).sum() == 2 and (image == 1.0).sum() == 2  # 0.5% of 400 at each end


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    # stored * 2 - 1024 = HU; window (40, 400) spans -160..240 HU.
    stored = np.zeros((8, 8), "uint16")
    stored.flat[:3] = [452, 532, 0]  # -120 HU, 40 HU, -1024 HU
    folder = dicom_folder(tmp_path, {"ct.dcm": {"pixels": stored, "bits_stored": 12,
                                                "rescale": (2.0, -1024.0)}})
    image = read_dicom_folder(folder, DataConfig(window=(40.0, 400.0))).load(0)
    np.testing.assert_allclose(image.flat[:3], [0.1, 0.5, 0.0], atol=1e-6)


def test_dicom_header_window_used_when_config_has_none(tmp_path: Path) -> None:
    stored = constant_with(452, 0)  # -120 HU
    header_window = ([40, 300], [400, 1500])  # multi-valued: the first pair counts
    folder = dicom_folder(tmp_path, {"ct.dcm": {"pixels": stored, "rescale": (2.0, -1024.0),
                                                "window": header_window}})
    assert read_dicom_folder(folder, DataConfig()).load(0).flat[0] == pytest.approx(0.1)
    configured = read_dicom_folder(folder, DataConfig(window=(-120.0, 100.0))).load(0)
    assert configured.flat[0] == pytest.approx(0.5)  # the configured window wins


def test_dicom_enhanced_multi_frame_rescale_from_functional_groups(tmp_path: Path) -> None:
    stored = np.zeros((2, 8, 8), "uint16")
    stored[:, 0, 0] = 452
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2.0, -1024.0
    group = Dataset()
    group.PixelValueTransformationSequence = Sequence([transform])
    extra = Dataset()
    extra.SharedFunctionalGroupsSequence = Sequence([group])
    folder = dicom_folder(tmp_path, {"mf.dcm": {"pixels": stored, "extra": extra}})
    source = read_dicom_folder(folder, DataConfig(window=(40.0, 400.0)))
    assert [source.load(i)[0, 0] for i in range(2)] == pytest.approx([0.1, 0.1])


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = ramp("uint16", 1000)
    folder = dicom_folder(tmp_path, {"m1.dcm": {"pixels": pixels, "photometric": "MONOCHROME1"},
                                     "m2.dcm": {"pixels": pixels}})
    source = read_dicom_folder(folder, DataConfig(window=(500.0, 1000.0)))
    np.testing.assert_allclose(source.load(0), 1.0 - source.load(1), atol=1e-6)
    assert source.load(0)[0, 0] == 1.0  # the lowest stored value is bright in MONOCHROME1


def test_dicom_multi_frame_gives_one_row_per_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), value, "uint16") for value in (100, 200, 300)])
    folder = dicom_folder(tmp_path, {"one.dcm": {"pixels": ramp("uint16", 50)},
                                     "mf.dcm": {"pixels": frames}})
    source = read_dicom_folder(folder, DataConfig(window=(200.0, 400.0)))
    assert source.refs == ["one.dcm (CSV line 2)", "mf.dcm frame 1 (CSV line 3)",
                           "mf.dcm frame 2 (CSV line 3)", "mf.dcm frame 3 (CSV line 3)"]
    assert [float(source.load(i)[0, 0]) for i in (1, 2, 3)] == pytest.approx([0.25, 0.5, 0.75])
    assert source.labels.shape == (4, 1)
    assert source.description == "4 DICOM images (frames of 2 files) listed in labels.csv"


def test_dicom_rgb_scaled_by_depth(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), "uint8")
    pixels[..., 0] = 255
    folder = dicom_folder(tmp_path, {"rgb.dcm": {"pixels": pixels, "photometric": "RGB"}})
    image = read_dicom_folder(folder, DataConfig()).load(0)
    assert image.shape == (8, 8, 3)
    np.testing.assert_allclose(image[0, 0], [1.0, 0.0, 0.0])


def test_dicom_patient_id_from_header_then_csv(tmp_path: Path) -> None:
    folder = dicom_folder(tmp_path, {"a.dcm": {"pixels": ramp("uint8", 9), "patient_id": "H1"},
                                     "b.dcm": {"pixels": ramp("uint8", 9)},
                                     "c.dcm": {"pixels": ramp("uint8", 9)},
                                     "d.dcm": {"pixels": ramp("uint8", 9), "patient_id": "H4"}},
                          csv_patients={"b.dcm": "C2", "d.dcm": "H4"})
    source = read_dicom_folder(folder, DataConfig())
    assert source.patient_ids == ["H1", "C2", None, "H4"]


def test_dicom_patient_id_from_header_without_csv_column(tmp_path: Path) -> None:
    folder = dicom_folder(tmp_path, {"a.dcm": {"pixels": ramp("uint8", 9), "patient_id": "H1"}})
    assert read_dicom_folder(folder, DataConfig()).patient_ids == ["H1"]


def test_dicom_header_and_csv_patients_disagreeing_is_refused(tmp_path: Path) -> None:
    folder = dicom_folder(tmp_path, {"a.dcm": {"pixels": ramp("uint8", 9), "patient_id": "P1"},
                                     "b.dcm": {"pixels": ramp("uint8", 9), "patient_id": "P2"}},
                          csv_patients={"a.dcm": "P1", "b.dcm": "P9"})
    with pytest.raises(UserError, match=r"b\.dcm \(CSV line 3\).*'P9'.*'P2'"):
        read_dicom_folder(folder, DataConfig())


def test_dicom_non_dicom_file_is_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "fake.dcm").write_text("this is a text file\n")
    write_csv(tmp_path, [{"path": "fake.dcm", "finding": 0}])
    with pytest.raises(UserError, match=r"fake\.dcm \(CSV line 2\): not a DICOM file"):
        read_dicom_folder(tmp_path, DataConfig())


def test_dicom_truncated_pixel_data_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = dicom_folder(tmp_path, {"ok.dcm": {"pixels": ramp("uint16", 99)},
                                     "cut.dcm": {"pixels": ramp("uint16", 99), "truncate": True}})
    source = read_dicom_folder(folder, DataConfig())
    source.load(0)
    with pytest.raises(UserError, match=r"cut\.dcm \(CSV line 3\): cannot decode") as caught:
        source.load(1)
    assert "\n" not in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_dicom_undecodable_compressed_pixels_are_refused(tmp_path: Path) -> None:
    folder = dicom_folder(tmp_path, {"jls.dcm": {"pixels": ramp("uint16", 99),
                                                 "transfer_syntax": JPEGLSLossless}})
    with pytest.raises(UserError, match=r"jls\.dcm \(CSV line 2\): cannot decode") as caught:
        read_dicom_folder(folder, DataConfig()).load(0)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------ NIfTI


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def nifti_folder(tmp_path: Path, volumes: dict[str, np.ndarray],
                 patients: dict[str, str] | None = None) -> Path:
    for name, data in volumes.items():
        write_nifti(tmp_path / name, data)
    rows: list[dict[str, object]] = []
    for name in volumes:
        row: dict[str, object] = {"path": name, "finding": 1}
        if patients is not None:
            row["patient_id"] = patients.get(name, "")
        rows.append(row)
    write_csv(tmp_path, rows)
    return tmp_path


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)


@pytest.mark.parametrize("axis, count, plane", [(0, 4, (6, 5)), (1, 5, (6, 4)), (2, 6, (5, 4))])
def test_nifti_slices_along_each_axis(tmp_path: Path, axis: int, count: int,
                                      plane: tuple[int, int]) -> None:
    folder = nifti_folder(tmp_path, {"v.nii.gz": noise((4, 5, 6))})
    source = read_nifti_folder(folder, DataConfig(nifti_axis=axis))
    assert len(source) == count and source.labels.shape == (count, 1)
    assert source.load(count - 1).shape == plane and source.load(0).dtype == np.float32
    assert source.bit_depth == 16
    assert source.refs[1] == "v.nii.gz slice 1 (CSV line 2)"


def test_nifti_axial_slice_is_upright_and_reoriented(tmp_path: Path) -> None:
    data = np.zeros((4, 5, 3), np.float32)
    data[0, 4, :] = 1.0  # patient's left (low x in RAS), most anterior (high y)
    write_nifti(tmp_path / "ras.nii", data)
    write_nifti(tmp_path / "las.nii", data[::-1].copy(), np.diag([-1.0, 1.0, 1.0, 1.0]))
    write_csv(tmp_path, [{"path": "ras.nii", "finding": 0}, {"path": "las.nii", "finding": 0}])
    source = read_nifti_folder(tmp_path, DataConfig(window=(0.5, 1.0)))
    ras, las = source.load(0), source.load(3)
    assert ras.shape == (5, 4) and ras[0, 0] == 1.0 and ras.sum() == 1.0  # top left
    np.testing.assert_array_equal(ras, las)  # same anatomy, stored mirrored: same slice


def test_nifti_empty_slices_are_skipped(tmp_path: Path) -> None:
    data = noise((4, 5, 6))
    data[:, :, 0] = 0.0
    data[:, :, 5] = 7.0
    folder = nifti_folder(tmp_path, {"v.nii": data})
    skipped = read_nifti_folder(folder, DataConfig())
    kept = [ref.split(" (")[0] for ref in skipped.refs]
    assert kept == [f"v.nii slice {k}" for k in (1, 2, 3, 4)]
    assert len(read_nifti_folder(folder, DataConfig(nifti_skip_empty=False))) == 6


def test_nifti_volume_with_only_empty_slices_is_refused(tmp_path: Path) -> None:
    folder = nifti_folder(tmp_path, {"good.nii": noise((4, 5, 6)),
                                     "blank.nii": np.zeros((4, 5, 6), np.float32)})
    with pytest.raises(UserError, match=r"blank\.nii \(CSV line 3\): no slice with signal"):
        read_nifti_folder(folder, DataConfig())


def test_nifti_patient_from_file_name_with_one_note(tmp_path: Path) -> None:
    folder = nifti_folder(tmp_path, {"brain01.nii.gz": noise((3, 3, 2)),
                                     "brain02.nii": noise((3, 3, 2), seed=1)})
    source = read_nifti_folder(folder, DataConfig())
    assert source.patient_ids == ["brain01", "brain01", "brain02", "brain02"]
    assert len(source.warnings) == 1 and "file names" in source.warnings[0]


def test_nifti_patient_from_csv(tmp_path: Path) -> None:
    folder = nifti_folder(tmp_path, {"brain01.nii.gz": noise((3, 3, 2)),
                                     "brain02.nii.gz": noise((3, 3, 2), seed=1)},
                          patients={"brain01.nii.gz": "P7", "brain02.nii.gz": "P7"})
    source = read_nifti_folder(folder, DataConfig())
    assert source.patient_ids == ["P7"] * 4 and source.warnings == []


def test_nifti_window_applied(tmp_path: Path) -> None:
    data = np.full((3, 3, 2), -1000.0, np.float32)  # air
    data[1, 1, :] = [50.0, 500.0]
    folder = nifti_folder(tmp_path, {"ct.nii.gz": data})
    source = read_nifti_folder(folder, DataConfig(window=(0.0, 200.0)))
    assert source.load(0)[1, 1] == pytest.approx(0.75)  # (50 + 100) / 200
    assert source.load(1)[1, 1] == 1.0 and source.load(1)[0, 0] == 0.0  # clipped


def test_nifti_without_window_uses_percentile_range(tmp_path: Path) -> None:
    folder = nifti_folder(tmp_path, {"mr.nii.gz": noise((10, 10, 2)) * 1000})
    source = read_nifti_folder(folder, DataConfig())
    both = np.stack([source.load(0), source.load(1)])
    assert both.min() == 0.0 and both.max() == 1.0
    assert (both == 1.0).sum() == 1  # 0.5% of 200 voxels at the top


def test_nifti_4d_volume_is_refused(tmp_path: Path) -> None:
    folder = nifti_folder(tmp_path, {"fmri.nii.gz": noise((3, 3, 2, 4))})
    refusal = r"fmri\.nii\.gz \(CSV line 2\): is 4-D.*one 3-D volume per file"
    with pytest.raises(UserError, match=refusal):
        read_nifti_folder(folder, DataConfig())


def test_nifti_4d_with_one_volume_is_accepted(tmp_path: Path) -> None:
    folder = nifti_folder(tmp_path, {"one.nii.gz": noise((3, 3, 2, 1))})
    assert len(read_nifti_folder(folder, DataConfig())) == 2


def test_nifti_truncated_file_is_refused_naming_it(tmp_path: Path) -> None:
    whole = write_nifti(tmp_path / "whole.nii.gz", noise((20, 20, 20))).read_bytes()
    (tmp_path / "whole.nii.gz").unlink()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    write_csv(tmp_path, [{"path": "cut.nii.gz", "finding": 1}])
    with pytest.raises(UserError, match=r"cut\.nii\.gz \(CSV line 2\): .*truncated") as caught:
        read_nifti_folder(tmp_path, DataConfig())
    assert "\n" not in str(caught.value)


def test_nifti_garbage_and_wrong_suffix_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header"))
    write_csv(tmp_path, [{"path": "junk.nii.gz", "finding": 1}])
    with pytest.raises(UserError, match=r"junk\.nii\.gz \(CSV line 2\): not a NIfTI file"):
        read_nifti_folder(tmp_path, DataConfig())
    write_nifti(tmp_path / "scan.nii", noise((3, 3, 2))).rename(tmp_path / "scan.img")
    write_csv(tmp_path, [{"path": "scan.img", "finding": 1}])
    with pytest.raises(UserError, match=r"scan\.img \(CSV line 2\): not a \.nii or \.nii\.gz"):
        read_nifti_folder(tmp_path, DataConfig())


def test_nifti_nan_and_inf_pass_through(tmp_path: Path) -> None:
    data = noise((4, 4, 4))
    data[0, 0, 0] = np.nan
    data[1, 1, 0] = np.inf
    data[:, :, 2] = np.nan  # constant but not "empty": kept for prepare to refuse
    data[:, :, 3] = np.inf
    folder = nifti_folder(tmp_path, {"v.nii": data})
    source = read_nifti_folder(folder, DataConfig())
    assert len(source) == 4
    first = source.load(0)
    assert np.isnan(first).sum() == 1 and np.isposinf(first).sum() == 1
    finite = first[np.isfinite(first)]
    assert finite.min() >= 0.0 and finite.max() <= 1.0 and finite.max() > 0.5
    assert np.isfinite(source.load(1)).all()
    assert np.isnan(source.load(2)).all() and np.isposinf(source.load(3)).all()


def test_nifti_load_reads_each_volume_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = nifti_folder(tmp_path, {"a.nii": noise((3, 3, 4)), "b.nii": noise((3, 3, 4), 1)})
    source = read_nifti_folder(folder, DataConfig())
    opened: list[str] = []
    real_load = nifti_module.nib.load

    def counting_load(path: Path) -> object:
        opened.append(Path(path).name)
        return real_load(path)

    monkeypatch.setattr(nifti_module.nib, "load", counting_load)
    images = [source.load(i) for i in range(len(source))]
    assert opened == ["a.nii", "b.nii"] and len(images) == 8


# ------------------------------------------------------------------------------- through the CLI


def test_dicom_folder_prepares_end_to_end_with_header_patients(cli, tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = {f"s{i}.dcm": {"pixels": rng.integers(0, 4096, (24, 20)).astype("uint16"),
                           "bits_stored": 12, "patient_id": f"P{i // 2}"} for i in range(12)}
    dicom_folder(folder, files)
    run = tmp_path / "run"
    result = cli("prepare", "--data", folder, "--out", run, "--set", "data.resolution=16")
    assert result.code == 0, result.stderr
    arrays = np.load(run / "prepare" / "arrays.npz")
    assert arrays["images"].shape == (12, 16, 16) and arrays["images"].dtype == np.uint16
    assert sorted(set(arrays["patient_id"].tolist())) == [f"P{i}" for i in range(6)]
    for patient in set(arrays["patient_id"].tolist()):
        assert len(set(arrays["split"][arrays["patient_id"] == patient].tolist())) == 1


def test_nifti_folder_prepares_end_to_end_and_bad_volume_exits_2(cli, tmp_path: Path) -> None:
    folder = tmp_path / "nifti"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 3)).astype(np.float32), np.eye(4)),
                 folder / f"vol{i}.nii.gz")
    write_csv(folder, [{"path": f"vol{i}.nii.gz", "finding": i % 2, "patient_id": f"P{i}"}
                       for i in range(4)])
    run = tmp_path / "run"
    result = cli("prepare", "--data", folder, "--out", run, "--set", "data.resolution=16")
    assert result.code == 0, result.stderr
    assert np.load(run / "prepare" / "arrays.npz")["images"].shape == (12, 16, 16)
    (folder / "vol2.nii.gz").write_bytes((folder / "vol2.nii.gz").read_bytes()[:200])
    refused = cli("prepare", "--data", folder, "--out", tmp_path / "run2")
    assert refused.code == 2 and "vol2.nii.gz (CSV line 4)" in refused.stderr
    assert not (tmp_path / "run2").exists()
