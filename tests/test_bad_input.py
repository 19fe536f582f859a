"""Bad input: what train.py does with every mistake a user can make in a CSV, an image folder or a flag.

The contract: a user mistake ends the run with exit status 2 and ONE line on stderr that starts with
`error:` and names the culprit (the CSV line, the file, the column or the flag), never a traceback. Mistakes
in the data are found before training starts, so no run directory is written. A few inputs that look odd
are fine and are accepted (a BOM, CRLF line endings, quoted commas, a repeated row).

One behaviour per test. Runs that only have to fail use the fast settings and fail in milliseconds; the
runs that have to train do one epoch of a handful of images.
"""

import csv
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import FAST, make_image, run_train, write_csv
from PIL import Image

import train
from errors import DataError
from images import BACKGROUND_RGB, load_image
from labels import read_labels

REPO = Path(__file__).resolve().parents[1]
# The cheapest run that shows an input is accepted: one epoch, fp32 (CPU bf16 autocast can be far slower),
# no RAM cache, and squeezenet1_1, which steps ~10x faster than resnet18 on CPU and has no BatchNorm, so
# a test of the data is not also a test of batch sizes.
QUICK = [*FAST, "--epochs", "1", "--amp", "off", "--cache", "off", "--model", "squeezenet1_1"]
# Six images of two classes from tiny_data: stratified, 4 train and 2 validation images.
FEW = [(f"{label}_{i}.png", label) for label in ("cat", "dog") for i in range(3)]


def error_line(capsys, status, alone=True):
    """The one `error:` line of a failed run, after checking the contract around it.

    alone: stderr holds nothing but that line (true of every error found before training starts; a
    failure during training may follow progress bars and warnings, so then it must only be the last line).
    """
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert lines[-1] == errors[0], err[-3000:]
    if alone:
        assert lines == errors, err[-3000:]
    assert len(errors[0]) > len("error: ") + 10
    return errors[0]


@pytest.fixture
def fail(tmp_path, capsys):
    """Run train.py (fast settings, then `argv`), expecting a user error before training; returns the line."""

    def run(*argv):
        out = tmp_path / "run"
        status = run_train("--output-dir", out, *FAST, *argv)
        line = error_line(capsys, status)
        assert not out.exists(), "the run directory was written before the error"
        return line

    return run


@pytest.fixture
def accept(tmp_path, capsys):
    """Train one quick epoch on `csv_path` under `root`, expecting success; returns (run dir, captured)."""

    def run(csv_path, root, *argv):
        out = tmp_path / "run"
        status = run_train("--csv", csv_path, "--root", root, "--output-dir", out, *QUICK, *argv)
        captured = capsys.readouterr()
        assert status == 0, captured.err[-3000:]
        assert "error:" not in captured.err and "Traceback" not in captured.err
        assert (out / "last.pt").is_file()
        return out, captured

    return run


def write_text(path, text, encoding="utf-8"):
    """Write a CSV exactly as given: line endings, BOM and odd bytes included."""
    Path(path).write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def split_images(run_dir):
    """The images a run used, from its split.csv."""
    with open(run_dir / "split.csv", newline="") as f:
        return sorted(row["image"] for row in csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ CSV file


def test_missing_csv_is_named(fail, tmp_path):
    line = fail("--csv", tmp_path / "nope.csv", "--root", tmp_path)
    assert "nope.csv" in line and "no such file" in line


def test_csv_that_is_a_directory_is_named(fail, tmp_path):
    (tmp_path / "folder.csv").mkdir()
    line = fail("--csv", tmp_path / "folder.csv", "--root", tmp_path)
    assert "folder.csv" in line and "directory" in line


def test_empty_csv_is_named(fail, tmp_path):
    csv_path = write_text(tmp_path / "labels.csv", "")
    line = fail("--csv", csv_path, "--root", tmp_path)
    assert "labels.csv" in line and "empty" in line


def test_header_only_csv_says_there_are_no_rows(fail, tmp_path):
    csv_path = write_text(tmp_path / "labels.csv", "image,label\n")
    line = fail("--csv", csv_path, "--root", tmp_path)
    assert "labels.csv" in line and "no rows" in line


def test_utf8_bom_is_accepted_and_trains(accept, tiny_data, tmp_path):
    _, root = tiny_data
    # Three columns, so the columns are found by name: a BOM left in the header would hide 'image'.
    text = "image,label,notes\n" + "".join(f"{image},{label},x\n" for image, label in FEW)
    csv_path = write_text(tmp_path / "bom.csv", text, encoding="utf-8-sig")
    run_dir, _ = accept(csv_path, root)
    assert split_images(run_dir) == sorted(image for image, _ in FEW)


def test_missing_columns_name_the_columns_found(fail, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [(i, lab, "x") for i, lab in FEW], header=("path", "cls", "notes"))
    line = fail("--csv", csv_path, "--root", root)
    assert "'image'" in line and "'path', 'cls', 'notes'" in line and "--image-col" in line


def test_duplicate_column_names_are_named(fail, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [(i, lab, lab) for i, lab in FEW], header=("image", "label", "label"))
    line = fail("--csv", csv_path, "--root", root)
    assert "duplicate column 'label'" in line


@pytest.mark.parametrize("bad_row", ["cat_1.png,cat,extra", "cat_1.png"], ids=["extra-field", "missing-field"])
def test_ragged_row_names_its_line(fail, tiny_data, tmp_path, bad_row):
    _, root = tiny_data
    csv_path = write_text(tmp_path / "labels.csv", f"image,label\ncat_0.png,cat\n{bad_row}\ndog_0.png,dog\n")
    line = fail("--csv", csv_path, "--root", root)
    assert "labels.csv line 3:" in line and "fields" in line


@pytest.mark.parametrize("label", ["", "NaN", "   "], ids=["empty", "nan", "whitespace"])
def test_missing_label_names_its_line(fail, tiny_data, tmp_path, label):
    _, root = tiny_data
    csv_path = write_text(tmp_path / "labels.csv", f"image,label\ncat_0.png,cat\ndog_0.png,dog\ncat_1.png,{label}\n")
    line = fail("--csv", csv_path, "--root", root)
    assert "labels.csv line 4:" in line and "label" in line and "cat_1.png" in line


def test_non_utf8_csv_names_its_line(fail, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_text(tmp_path / "labels.csv", b"image,label\ncat_0.png,cat\ncaf\xe9.png,cat\n")
    line = fail("--csv", csv_path, "--root", root)
    assert "labels.csv line 3:" in line and "UTF-8" in line


def test_quoted_commas_and_crlf_line_endings_are_accepted(accept, tiny_data, tmp_path):
    _, root = tiny_data
    shutil.copy(root / "cat_0.png", root / "cat, sitting.png")
    rows = [("cat, sitting.png", "cat")] + FEW[1:]
    text = "image,label\r\n" + "".join(f'"{image}",{label}\r\n' for image, label in rows)
    csv_path = write_text(tmp_path / "labels.csv", text)
    run_dir, _ = accept(csv_path, root)
    assert "cat, sitting.png" in split_images(run_dir)


def test_duplicate_path_with_conflicting_labels_names_both_lines(fail, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [*FEW, ("cat_0.png", "dog")])
    line = fail("--csv", csv_path, "--root", root)
    assert "cat_0.png" in line and "conflicting labels" in line and "lines 2, 8" in line


def test_duplicate_path_with_the_same_label_is_dropped_with_a_warning(accept, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [*FEW, ("cat_0.png", "cat")])
    run_dir, captured = accept(csv_path, root)
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "labels.csv" in warnings[0] and "1 repeated row" in warnings[0]
    assert split_images(run_dir) == sorted(image for image, _ in FEW)


def test_val_csv_label_outside_training_classes_fails_before_training(fail, tiny_data, tmp_path):
    csv_path, root = tiny_data
    val_csv = write_csv(tmp_path / "val.csv", [("cat_0.png", "cat"), ("dog_0.png", "wolf")])
    line = fail("--csv", csv_path, "--root", root, "--val-csv", val_csv)
    assert "val.csv" in line and "wolf" in line


def test_two_columns_with_other_names_are_used_in_order(accept, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", FEW, header=("filename", "species"))
    run_dir, _ = accept(csv_path, root)
    assert split_images(run_dir) == sorted(image for image, _ in FEW)
    assert torch.load(run_dir / "last.pt", weights_only=True)["class_names"] == ["cat", "dog"]


def test_image_col_and_label_col_pick_the_columns(accept, tiny_data, tmp_path):
    _, root = tiny_data
    rows = [(label, "note", image) for image, label in FEW]
    csv_path = write_csv(tmp_path / "labels.csv", rows, header=("species", "notes", "filename"))
    run_dir, _ = accept(csv_path, root, "--image-col", "filename", "--label-col", "species")
    assert torch.load(run_dir / "last.pt", weights_only=True)["class_names"] == ["cat", "dog"]


def test_image_col_naming_a_missing_column_names_the_flag(fail, tiny_data):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, "--image-col", "filename")
    assert "'filename'" in line and "--image-col" in line and "'image', 'label'" in line


def test_unicode_line_separator_inside_a_name_is_not_a_line_break(tmp_path):
    # U+2028 and form feeds end lines for str.splitlines, not for CSV readers and editors.
    text = "image,label\r\nsome\u2028thing.png,cat\r\nform\x0cfeed.png,dog\r\nfox.png,\r\n"
    csv_path = write_text(tmp_path / "labels.csv", text)
    with pytest.raises(DataError, match=r"labels\.csv line 4: missing label .* fox\.png"):
        read_labels(csv_path)
    write_text(csv_path, text.replace("fox.png,", "fox.png,fox"))
    assert list(read_labels(csv_path)["image"]) == ["some\u2028thing.png", "form\x0cfeed.png", "fox.png"]


# ----------------------------------------------------------------------------------- paths escaping --root


@pytest.fixture
def outside_image(tmp_path):
    """A real image next to --root, not inside it: refusing it is about the path, not a missing file."""
    path = tmp_path / "secret.png"
    make_image(path, 0, np.random.default_rng(1))
    return path


def _escaping_path_fails(fail, tiny_data, tmp_path, image):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [*FEW, (image, "cat")])
    line = fail("--csv", csv_path, "--root", root)
    assert "line 8" in line
    return line


def test_parent_path_escaping_root_is_refused(fail, tiny_data, tmp_path, outside_image):
    line = _escaping_path_fails(fail, tiny_data, tmp_path, "../secret.png")
    assert "../secret.png" in line and "outside --root" in line


def test_absolute_path_is_refused(fail, tiny_data, tmp_path, outside_image):
    line = _escaping_path_fails(fail, tiny_data, tmp_path, str(outside_image))
    assert str(outside_image) in line and "relative to --root" in line


def test_home_path_is_refused(fail, tiny_data, tmp_path):
    line = _escaping_path_fails(fail, tiny_data, tmp_path, "~/secret.png")
    assert "~/secret.png" in line and "relative to --root" in line


def test_symlink_inside_root_pointing_outside_is_refused(fail, tiny_data, tmp_path, outside_image):
    _, root = tiny_data
    (root / "link.png").symlink_to(outside_image)
    line = _escaping_path_fails(fail, tiny_data, tmp_path, "link.png")
    assert "link.png" in line and "outside --root" in line


def test_nul_byte_in_a_path_names_its_line(fail, tiny_data, tmp_path):
    _, root = tiny_data
    text = "image,label\n" + "".join(f"{image},{label}\n" for image, label in FEW) + "cat_0\0.png,cat\n"
    csv_path = write_text(tmp_path / "labels.csv", text)
    line = fail("--csv", csv_path, "--root", root)
    assert "labels.csv line 8" in line and "NUL" in line


# ------------------------------------------------------------------------------ files checked before training


def _bad_file(root, kind):
    name = {"missing": "gone.png", "directory": "folder.png", "empty": "empty.png", "text": "notes.png"}[kind]
    if kind == "directory":
        (root / name).mkdir()
    elif kind == "empty":
        (root / name).write_bytes(b"")
    elif kind == "text":
        (root / name).write_text("this is not an image\n")
    return name


@pytest.mark.parametrize(
    "kind, reason",
    [("missing", "no such file"), ("directory", "not a file"), ("empty", "empty file"), ("text", "not an image")],
)
def test_unusable_image_file_is_named_before_training(fail, tiny_data, tmp_path, kind, reason):
    _, root = tiny_data
    name = _bad_file(root, kind)
    csv_path = write_csv(tmp_path / "labels.csv", [*FEW, (name, "dog")])
    line = fail("--csv", csv_path, "--root", root)
    assert f"line 8 {name} ({reason}" in line and re.search(r"\b1 of \d+ images", line)


def test_all_unusable_files_are_counted_in_one_error_showing_the_first_few(fail, tiny_data, tmp_path):
    csv_path, root = tiny_data
    rows = [(f"gone_{label}{i}.png", label) for i in range(4) for label in ("cat", "dog", "fox")]  # 12 missing
    csv_path = write_csv(tmp_path / "labels.csv", [*FEW, *rows, ("folder.png", "cat")])
    (root / "folder.png").mkdir()
    line = fail("--csv", csv_path, "--root", root)
    # Every bad file of the CSV is counted, whichever side of the split it falls on, so one run reports all.
    assert "13 of 19 images" in line and "line 8 gone_cat0.png (no such file)" in line  # the first, by line
    assert 1 <= len(re.findall(r"line \d+ gone_\w+\.png \(no such file\)", line)) <= 5 and line.endswith("...")


# ---------------------------------------------------------------------------------- images failing to decode


def truncate_after_header(path):
    """Cut an image's bytes a little after its header: Pillow opens it and reads its size, decoding fails."""
    data = path.read_bytes()
    marker = b"IDAT" if data.startswith(b"\x89PNG") else b"\xff\xda"  # first pixel data / JPEG start of scan
    path.write_bytes(data[: data.index(marker) + 40])


def make_truncated(tiny_data, tmp_path, kind="png", good=FEW):
    """A training CSV of the `good` rows and then a truncated image that passes the header check (line 8
    after FEW), and a separate validation CSV of good images; returns (csv, val_csv, root, bad image name)."""
    _, root = tiny_data
    name = f"broken.{'png' if kind == 'png' else 'jpg'}"
    make_image(root / name, 0, np.random.default_rng(2), size=64)
    truncate_after_header(root / name)
    with Image.open(root / name) as im:
        assert im.size == (64, 64)
        with pytest.raises(OSError):
            im.load()
    csv_path = write_csv(tmp_path / "train.csv", [*good, (name, "cat")])
    val_csv = write_csv(tmp_path / "val.csv", [("cat_5.png", "cat"), ("dog_5.png", "dog")])
    return csv_path, val_csv, root, name


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_truncated_image_stops_training_naming_file_and_line_and_keeps_last_pt(tiny_data, tmp_path, capsys, kind):
    csv_path, val_csv, root, name = make_truncated(tiny_data, tmp_path, kind)
    out = tmp_path / "run"
    status = run_train("--csv", csv_path, "--val-csv", val_csv, "--root", root, "--output-dir", out, *QUICK)
    line = error_line(capsys, status, alone=False)
    assert f"line 8 {name}" in line and "--skip-bad-images" in line
    assert (out / "last.pt").is_file()


def test_skip_bad_images_trains_warns_and_counts_skipped(tiny_data, tmp_path, capsys):
    csv_path, val_csv, root, name = make_truncated(tiny_data, tmp_path)
    out = tmp_path / "run"
    argv = ["--csv", csv_path, "--val-csv", val_csv, "--root", root, "--output-dir", out, *QUICK]
    status = run_train(*argv, "--skip-bad-images")
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    warnings = [line for line in re.split(r"[\r\n]+", captured.err) if line.startswith("warning:")]
    assert len(warnings) == 1 and f"line 8 {name}" in warnings[0]
    summary = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1")]
    assert len(summary) == 1 and "skipped 1 bad image" in summary[0]


def test_batch_whose_every_sample_fails_is_skipped(tiny_data, tmp_path, capsys):
    csv_path, val_csv, root, _ = make_truncated(tiny_data, tmp_path, good=[FEW[0], FEW[3]])
    out = tmp_path / "run"
    argv = ["--csv", csv_path, "--val-csv", val_csv, "--root", root, "--output-dir", out, *QUICK]
    status = run_train(*argv, "--skip-bad-images", "--batch-size", "1")  # the bad image is a batch of its own
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    assert "Traceback" not in captured.err
    assert "skipped 1 bad image" in captured.out
    assert (out / "last.pt").is_file() and (out / "metrics.csv").is_file()


def test_last_training_batch_of_one_image_trains(accept, tiny_data, tmp_path):
    # 4 training images in batches of 3 leave a last batch of one, whose 1x1 resnet18 features BatchNorm
    # cannot normalise in training mode: the loader must not hand it such a batch (or the loop skip it).
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", FEW)
    _, captured = accept(csv_path, root, "--model", "resnet18", "--batch-size", "3")
    assert "last training batch, a single image, is dropped" in captured.out  # said at startup


# -------------------------------------------------------------------------------------- image modes to RGB


def pixel(path, xy=(0, 0)):
    image = load_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_greyscale_loads_as_equal_channels(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert pixel(tmp_path / "l.png") == (77, 77, 77)


def test_palette_with_transparency_is_composited_on_the_background(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "p.png", transparency=0)
    assert pixel(tmp_path / "p.png", (0, 0)) == BACKGROUND_RGB  # transparent black shows the background
    assert pixel(tmp_path / "p.png", (1, 1)) == (200, 30, 30)


def test_rgba_is_composited_on_white(tmp_path):
    assert BACKGROUND_RGB == (255, 255, 255)
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.putpixel((1, 1), (10, 120, 200, 255))
    image.save(tmp_path / "rgba.png")
    assert pixel(tmp_path / "rgba.png", (0, 0)) == (255, 255, 255)
    assert pixel(tmp_path / "rgba.png", (1, 1)) == (10, 120, 200)


def test_cmyk_loads_as_its_rgb_colour(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).convert("CMYK").save(tmp_path / "cmyk.tif")
    with Image.open(tmp_path / "cmyk.tif") as im:
        assert im.mode == "CMYK"
    assert pixel(tmp_path / "cmyk.tif") == (255, 0, 0)


def test_one_bit_loads_as_black_and_white(tmp_path):
    image = Image.new("1", (8, 8), 0)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "bits.png")
    assert pixel(tmp_path / "bits.png", (0, 0)) == (0, 0, 0)
    assert pixel(tmp_path / "bits.png", (1, 1)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    gradient = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    array = np.asarray(load_image(tmp_path / "deep.png"))
    assert len(np.unique(array[:, :, 0])) > 200  # many more than the 17 levels of a clipped or coarse convert
    assert array[-1, -1].tolist() == [255, 255, 255] and array[0, 0].tolist() == [0, 0, 0]


def test_animated_gif_loads_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with Image.open(tmp_path / "anim.gif") as im:
        assert im.n_frames == 2
    assert pixel(tmp_path / "anim.gif") == (255, 0, 0)


def test_exif_orientation_6_is_rotated_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


# ------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--lr", "0"),
        ("--lr", "-0.001"),
        ("--val-split", "0"),
        ("--val-split", "1.5"),
    ],
)
def test_out_of_range_flag_is_named(fail, tiny_data, flag, value):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, flag, value)
    assert line.startswith(f"error: {flag} ") and value in line


def test_unknown_flag_is_named(fail, tiny_data):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, "--epoch-count", "3")
    assert "--epoch-count" in line


def test_under_torchrun_a_flag_mistake_is_said_by_rank_0_only(tiny_data, capsys, monkeypatch):
    csv_path, root = tiny_data
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert run_train("--csv", csv_path, "--root", root, "--epochs", "0") == 2
        assert ("error: --epochs" in capsys.readouterr().err) is says


def test_non_numeric_flag_value_is_named(fail, tiny_data):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, "--epochs", "three")
    assert "--epochs" in line and "three" in line


def test_unknown_model_suggests_close_names(fail, tiny_data):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, "--model", "resnet19")
    assert "--model resnet19" in line and "did you mean" in line and "resnet18" in line


def test_unknown_weights_name_lists_the_choices(fail, tiny_data):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, "--weights", "IMAGENET9K_V9")
    assert "--weights IMAGENET9K_V9" in line and "IMAGENET1K_V1" in line


def test_weights_file_for_another_architecture_is_refused(fail, tiny_data, tmp_path):
    csv_path, root = tiny_data
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    line = fail("--csv", csv_path, "--root", root, "--model", "mobilenet_v3_small", "--weights", path)
    assert f"--weights {path}" in line and "mobilenet_v3_small" in line and "another --model" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(fail, tiny_data):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, "--device", "cuda")
    assert "--device cuda" in line and "--device cpu" in line


def test_fewer_than_two_classes_is_refused(fail, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [(f"cat_{i}.png", "cat") for i in range(8)])
    line = fail("--csv", csv_path, "--root", root)
    assert "labels.csv" in line and "'cat'" in line and "at least 2" in line


def test_split_leaving_validation_empty_is_refused(fail, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [("cat_0.png", "cat"), ("dog_0.png", "dog")])
    line = fail("--csv", csv_path, "--root", root, "--split", "stratified")
    assert "no validation images" in line and "--val-split" in line


def test_split_leaving_training_empty_is_refused(fail, tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_csv(tmp_path / "labels.csv", [("cat_0.png", "cat"), ("dog_0.png", "dog")])
    line = fail("--csv", csv_path, "--root", root, "--split", "random", "--val-split", "0.9")
    assert "no training images" in line and "--val-split" in line


# ------------------------------------------------------------------------------------------ --resume files


class Payload:
    """Unpickling this runs `action(*args)`: what a malicious checkpoint would do."""

    def __init__(self, action, *args):
        self.action, self.args = action, args

    def __reduce__(self):
        return self.action, self.args


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("how", ["open", "os.system"])
def test_malicious_resume_checkpoint_is_refused_without_running_it(fail, tiny_data, tmp_path, writer, how):
    csv_path, root = tiny_data
    marker = tmp_path / "pwned"
    payload = Payload(open, str(marker), "w") if how == "open" else Payload(os.system, f"touch {marker}")
    checkpoint = {"model": payload, "args": {}, "epoch": 1}
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save(checkpoint, f) if writer == "torch.save" else pickle.dump(checkpoint, f)
    line = fail("--csv", csv_path, "--root", root, "--resume", path)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert re.fullmatch(rf"error: --resume {re.escape(str(path))}: .{{10,}}", line)
    if writer == "torch.save":  # torch names the refused global; a legacy pickle only fails on an opcode
        assert "Python objects" in line


def _small_checkpoint():
    buffer = io.BytesIO()
    torch.save({"model": torchvision.models.resnet18().state_dict(), "args": {"epochs": 1}, "epoch": 1}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content", ["empty", "truncated", "random"])
def test_unreadable_resume_file_is_one_line_naming_it(fail, tiny_data, tmp_path, content):
    csv_path, root = tiny_data
    path = tmp_path / "last.pt"
    if content == "empty":
        data = b""
    elif content == "truncated":
        data = _small_checkpoint()
        data = data[: len(data) // 2]
    else:
        data = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    line = fail("--csv", csv_path, "--root", root, "--resume", path)
    match = re.fullmatch(rf"error: --resume {re.escape(str(path))}: (.+)", line)
    assert match and len(match.group(1).strip()) > 10 and "()" not in line
    assert "Python objects" not in line  # damaged, not unsafe: a user must not go looking for objects in it


def test_missing_resume_file_is_named(fail, tiny_data, tmp_path):
    csv_path, root = tiny_data
    line = fail("--csv", csv_path, "--root", root, "--resume", tmp_path / "nope.pt")
    assert "nope.pt" in line and "no such file" in line


# ------------------------------------------------------------------------------------------- the real CLI


def test_command_line_prints_no_traceback_for_a_bad_csv(tiny_data, tmp_path):
    _, root = tiny_data
    csv_path = write_text(tmp_path / "labels.csv", "image,label\ncat_0.png,cat,extra\n")
    command = [sys.executable, "train.py", "--csv", csv_path, "--root", root, "--output-dir", tmp_path / "run", *FAST]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error:") and "labels.csv line 2" in result.stderr


def test_missing_root_folder_is_named(tiny_data, tmp_path, capsys):
    csv_path, _ = tiny_data
    assert run_train("--csv", csv_path, "--root", tmp_path / "nowhere", *FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere" in err and "--root" in err and len(err.splitlines()) == 1


def test_root_defaults_to_the_csv_folder(tmp_path):
    args = train.get_args_parser().parse_args(["--csv", str(tmp_path / "labels.csv")])
    train.check_args(args)
    assert args.root == str(tmp_path)


def test_output_dir_that_cannot_be_created_is_named(tiny_data, tmp_path, capsys):
    csv_path, root = tiny_data
    (tmp_path / "a_file").write_text("not a folder")
    assert run_train("--csv", csv_path, "--root", root, *FAST, "--output-dir", tmp_path / "a_file" / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output-dir") and len(err.splitlines()) == 1


def test_image_size_too_small_for_the_model_is_refused_before_training(tiny_data, tmp_path, capsys):
    csv_path, root = tiny_data
    fast = [a if a != "resnet18" else "inception_v3" for a in FAST]
    assert run_train("--csv", csv_path, "--root", root, *fast, "--output-dir", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image-size 32") and "inception_v3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_single_training_image_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name, label in (("a.png", 0), ("b.png", 1), ("c.png", 1)):
        make_image(tmp_path / name, label, rng)
    csv_path = write_csv(tmp_path / "labels.csv", [("a.png", "x"), ("b.png", "y"), ("c.png", "y")])
    assert run_train("--csv", csv_path, *FAST, "--split", "random", "--val-split", "0.5") == 2
    assert "leaves 1 training image" in capsys.readouterr().err
