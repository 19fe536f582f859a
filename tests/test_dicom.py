"""DICOM files are images (issue 30): rendered with pydicom's modality LUT, VOI LUT or window (--window and its
presets), MONOCHROME1 inverted; found without an extension by their magic bytes; grouped by a header element
(--group-col dicom:PatientID); compressed files without a decoder, truncated or non-DICOM files reported."""

import numpy as np
import pydicom
import pytest
from conftest import FAST, read_rows, run_train, write_csv
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.processing import apply_windowing
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, SecondaryCaptureImageStorage, generate_uid

import export
import images
import labels
import predict
from errors import DataError


def write_dicom(path, stored, photometric="MONOCHROME2", intercept=-1024.0, slope=1.0, window=None, patient="P0"):
    """A CT-like uncompressed DICOM file of the uint16 array `stored`; returns its path."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient, "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_pixels(seed, size=24, low=600, high=1800):
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, (size, size)).astype(np.uint16)


def grey(image):
    array = np.asarray(image)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0].astype(int)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_a_dicom_renders_as_pydicom_renders_it(tmp_path, photometric):
    path = write_dicom(tmp_path / "ct.dcm", stored_pixels(0), photometric, window=(40, 400))
    ds = pydicom.dcmread(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0)
    low, high = 0 * 1.0 - 1024, (2**12 - 1) * 1.0 - 1024  # the VOI output range, PS3.3 C.11.2.1.2 (rescaled)
    if photometric == "MONOCHROME1":
        values = high + low - values
    expected = np.rint((values - low) / (high - low) * 255)
    assert np.abs(grey(images.load_image(path)) - expected).max() <= 1
    assert images.upright_size(path) == (24, 24) and images.planned_pixels(path) == 24 * 24


def test_window_presets_give_the_standards_windowing(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", stored_pixels(1), window=(40, 400))
    hu = apply_modality_lut(pydicom.dcmread(path).pixel_array, pydicom.dcmread(path))
    rendered = {}
    for name, (center, width) in (("lung", (-600, 1500)), ("bone", (400, 1800))):
        # PS3.3 C.11.2.1.2.1, the linear function, to 0..255
        c, w = center - 0.5, width - 1
        expected = np.clip(((hu - c) / w + 0.5) * 255, 0, 255)
        expected[hu <= c - w / 2], expected[hu > c + w / 2] = 0, 255
        rendered[name] = grey(images.load_image(path, window=name))
        assert np.abs(rendered[name] - np.rint(expected)).max() <= 1
        assert images.load_image(path, window=f"{center},{width}") == images.load_image(path, window=name)
    assert (rendered["lung"] != rendered["bone"]).mean() > 0.5
    with pytest.raises(ValueError, match="preset"):
        images.parse_window("liver")


def test_window_applies_to_16_bit_png_stored_values(tmp_path):
    from PIL import Image

    values = stored_pixels(2).astype(np.int32)
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "x.png")
    view = Dataset()
    view.PhotometricInterpretation, view.BitsStored, view.PixelRepresentation = "MONOCHROME2", 8, 0
    view.WindowCenter, view.WindowWidth = 1200, 400
    expected = np.rint(apply_windowing(values.astype(float), view))
    assert np.abs(grey(images.load_image(tmp_path / "x.png", window="1200,400")) - expected).max() <= 1


def windowed_classes(folder, per_class=10):
    """Two classes whose stored pixels are the same pair by pair: only RescaleIntercept (the HU) differs, so
    only the modality LUT and a window separate them. No extensions: found by the DICOM magic bytes."""
    for label, intercept in (("air", -1024.0), ("fat", -600.0)):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            patient = f"{label}{i // 2}"
            write_dicom(
                folder / label / f"IM{i:04d}",
                stored_pixels(100 + i, low=900, high=1100),
                intercept=intercept,
                patient=patient,
            )


def test_extensionless_dicom_folders_train_predict_and_export_and_the_window_separates(tmp_path, capsys):
    data = tmp_path / "data"
    windowed_classes(data)
    assert images.is_image_file(data / "air" / "IM0000") and not images.is_image_file(tmp_path / "nothing")
    # the raw rendering (stored values, own min..max) of the two classes is identical: only the window tells
    for i in range(10):
        raw = [images.load_image(data / label / f"IM{i:04d}") for label in ("air", "fat")]
        assert raw[0] == raw[1]
    windowed = [images.load_image(data / label / "IM0000", window="150,700") for label in ("air", "fat")]
    assert grey(windowed[1]).mean() > grey(windowed[0]).mean() + 60
    run = tmp_path / "run"
    argv = ["--data", data, "--window", "150,700", "--epochs", "2", "--val-split", "0.4", *FAST]
    assert run_train(*argv, "--output-dir", run) == 0
    best_acc = max(float(row["val_acc"]) for row in read_rows(run / "metrics.csv"))
    assert best_acc >= 0.85
    out = tmp_path / "pred.csv"
    assert predict.run_cli([str(run / "best.pt"), str(data), "--out", str(out)]) == 0
    predicted = read_rows(out)
    assert len(predicted) == 20
    right = sum(row["label"] == ("air" if "/air/" in row["image"] else "fat") for row in predicted)
    assert right >= 16  # the checkpoint's window is applied
    assert export.run_cli([str(run / "best.pt"), "--out", str(tmp_path / "model.onnx")]) == 0
    onnx_out = tmp_path / "pred_onnx.csv"
    assert predict.run_cli([str(tmp_path / "model.onnx"), str(data), "--out", str(onnx_out)]) == 0
    assert [row["label"] for row in read_rows(onnx_out)] == [row["label"] for row in predicted]  # same window
    capsys.readouterr()


def test_group_col_dicom_keeps_every_patient_in_one_part(tmp_path, capsys):
    data = tmp_path / "data"
    windowed_classes(data)
    run = tmp_path / "run"
    argv = ["--data", data, "--group-col", "dicom:PatientID", "--epochs", "1", "--no-duplicate-check", *FAST]
    assert run_train(*argv, "--output-dir", run) == 0
    parts_of = {}
    for row in read_rows(run / "split.csv"):
        assert row["group"] == pydicom.dcmread(data / row["image"], stop_before_pixels=True).PatientID
        parts_of.setdefault(row["group"], set()).add(row["split"])
    assert len(parts_of) == 10 and all(len(parts) == 1 for parts in parts_of.values())
    assert "grouped by dicom:PatientID: 10 groups" in capsys.readouterr().out


def test_a_missing_dicom_keyword_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    windowed_classes(data, per_class=2)
    assert run_train("--data", data, "--group-col", "dicom:AccessionNumber", *FAST, "--output-dir", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "AccessionNumber" in err and "IM000" in err and "Traceback" not in err


def compressed_copy(source, path, syntax):
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(200) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def bad_folder(tmp_path, bad):
    data = tmp_path / "data"
    windowed_classes(data, per_class=4)
    bad(data / "air" / "bad.dcm")
    return data


@pytest.mark.skipif(get_decoder(JPEGLosslessSV1).is_available, reason="a JPEG Lossless decoder is installed")
def test_a_compressed_dicom_without_its_decoder_is_named_or_skipped(tmp_path, capsys):
    data = bad_folder(tmp_path, lambda path: compressed_copy(path.parent / "IM0000", path, JPEGLosslessSV1))
    assert run_train("--data", data, "--epochs", "1", *FAST, "--output-dir", tmp_path / "r1") == 2
    err = capsys.readouterr().err
    assert "bad.dcm" in err and "JPEG Lossless" in err and "pylibjpeg" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert run_train("--data", data, "--epochs", "1", "--skip-bad-images", *FAST, "--output-dir", tmp_path / "r2") == 0
    assert "dropped 1 unusable images" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated", "not dicom"])
def test_a_truncated_or_non_dicom_dcm_file_is_named(tmp_path, capsys, kind):
    def bad(path):
        if kind == "truncated":
            path.write_bytes((path.parent / "IM0000").read_bytes()[:700])
        else:
            path.write_bytes(b"hello, not a DICOM file\n" * 20)

    data = bad_folder(tmp_path, bad)
    with pytest.raises(DataError, match="bad.dcm"):
        images.check_images(__import__("labels").image_folders(data)[0], data, str(data), skip_bad=False)
    assert run_train("--data", data, "--epochs", "1", *FAST, "--output-dir", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "bad.dcm" in err and "Traceback" not in err


def test_a_bad_window_is_one_usage_line(tmp_path, capsys):
    assert run_train("--window", "wide", *FAST, "--output-dir", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --window") and len(err.splitlines()) == 1


def test_multi_frame_uses_the_first_frame_and_warns_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(images, "_warned_multiframe", type(images._warned_multiframe)())
    frames = np.stack([stored_pixels(5), stored_pixels(6)])
    path = write_dicom(tmp_path / "single.dcm", frames[0])
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames, ds.PixelData = 2, frames.astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    assert images.load_image(tmp_path / "multi.dcm") == images.load_image(path)
    images.load_image(tmp_path / "multi.dcm")
    err = capsys.readouterr().err
    assert err.count("2 frames") == 1


def test_colour_dicom_comes_out_as_rgb(tmp_path):
    rgb = np.random.default_rng(7).integers(0, 256, (8, 10, 3)).astype(np.uint8)
    ds = pydicom.dcmread(write_dicom(tmp_path / "grey.dcm", stored_pixels(7, size=8)))
    ds.Rows, ds.Columns = 8, 10
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    assert (np.asarray(images.load_image(tmp_path / "rgb.dcm")) == rgb).all()


def test_group_col_dicom_reads_the_headers_of_csv_images(tmp_path):
    data = tmp_path / "data"
    windowed_classes(data, per_class=4)
    rows = [(f"{label}/IM{i:04d}", label) for label in ("air", "fat") for i in range(4)]
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    everything = labels.read_image_sets(csv=csv_path, root=data, group_col="dicom:PatientID")[0]
    assert list(everything.samples["group"]) == [f"{label}{i // 2}" for label in ("air", "fat") for i in range(4)]


def test_subgroup_col_dicom_reads_each_image_s_header_value(tmp_path):
    data = tmp_path / "data"
    windowed_classes(data, per_class=4)
    folder_set = labels.read_image_sets(data=data)[0]
    values = labels.subgroup_values(folder_set, "dicom:PatientID,dicom:Manufacturer")
    patients = [
        pydicom.dcmread(data / image, stop_before_pixels=True).PatientID for image in folder_set.samples["image"]
    ]
    assert values["dicom:PatientID"] == patients
    assert set(values["dicom:Manufacturer"]) == {"missing"}  # not in these headers: its own subgroup
    with pytest.raises(labels.DataError, match="--subgroup-col site: .* not a CSV"):
        labels.subgroup_values(folder_set, "site")
