"""predict.py: predictions for folders and CSVs, reproducing validation accuracy, and refusing bad input."""

import math
import shutil

import pytest
import torch
from conftest import read_rows, write_csv

import models
import predict

CLASSES = ["cat", "dog", "fox"]


def run_predict(*argv):
    return predict.run_cli([str(a) for a in argv])


@pytest.fixture
def untrained_checkpoint(tmp_path):
    """A checkpoint in train.py's format without the cost of training, for tests that never get to predict."""
    path = tmp_path / "untrained.pt"
    model = models.build_model("resnet18", len(CLASSES))
    meta = dict(model_name="resnet18", class_names=CLASSES, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    torch.save(dict(model=model.state_dict(), **meta), path)
    return path


def test_folder_gives_one_row_per_image_with_probabilities(train_tiny, tiny_data, tmp_path, capsys):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    capsys.readouterr()  # drop train.py's output
    root = tiny_data[1]
    out = tmp_path / "pred.csv"
    assert run_predict(run_dir / "best.pt", root, "--out", out, "--topk", "2", "--workers", "0", "--device", "cpu") == 0

    rows = read_rows(out)
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in root.glob("*.png"))
    columns = ["image", "label", "confidence", "top2_label", "top2_confidence", "decision", *CLASSES]
    assert list(rows[0]) == columns
    for row in rows:
        probs = [float(row[c]) for c in CLASSES]
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-4)
        assert row["label"] in CLASSES and row["top2_label"] in CLASSES and row["top2_label"] != row["label"]
        assert float(row["confidence"]) == max(probs) >= float(row["top2_confidence"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "image,label,confidence,top2_label,top2_confidence,decision"
    assert len(printed) == 1 + len(rows)


def test_validation_rows_reproduce_the_runs_validation_accuracy_and_loss(train_tiny, tiny_data, tmp_path, capsys):
    # one epoch: best.pt is the epoch metrics.csv describes; uncalibrated, as metrics.csv's epochs are
    status, run_dir = train_tiny("--epochs", "1", "--no-calibrate")
    assert status == 0
    val_rows = [r for r in read_rows(run_dir / "split.csv") if r["split"] == "val"]
    val_csv = write_csv(
        tmp_path / "val.csv",
        [(r["image"], r["label"], r["split"]) for r in val_rows],
        header=("image", "label", "split"),
    )
    out = tmp_path / "pred.csv"
    argv = [run_dir / "best.pt", val_csv, "--root", tiny_data[1], "--out", out, "--workers", "0", "--device", "cpu"]
    # train.py validates in batches of 2 x 8, and in its own precision (--amp auto; predict's default is fp32)
    assert run_predict(*argv, "--batch-size", "16", "--amp", "auto") == 0

    truth = {r["image"]: r["label"] for r in val_rows}
    rows = read_rows(out)
    assert sorted(r["image"] for r in rows) == sorted(truth)
    accuracy = sum(r["label"] == truth[r["image"]] for r in rows) / len(rows)
    loss = -sum(math.log(float(r[truth[r["image"]]])) for r in rows) / len(rows)
    metrics = read_rows(run_dir / "metrics.csv")[-1]
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert accuracy == pytest.approx(float(metrics["val_acc"]), abs=1e-5)
    assert accuracy == pytest.approx(checkpoint["best"]["val_acc"], abs=1e-9)
    # After one epoch the model may well predict one class for everything, so equal accuracy proves little;
    # the loss sees every probability, so a preprocessing or precision difference shows up here (a resize
    # off by a few pixels moves it by ~1%, fp32 instead of the run's bf16 by ~0.1%).
    assert loss == pytest.approx(float(metrics["val_loss"]), rel=2e-4)
    assert f"accuracy {accuracy:.4f}" in capsys.readouterr().err


def test_unreadable_images_are_reported_and_skipped(train_tiny, tiny_data, tmp_path, capsys):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("cat_0.png", "dog_0.png", "fox_0.png"):
        shutil.copy(tiny_data[1] / name, folder / name)
    (folder / "broken.png").write_bytes(b"this is not a png")
    # A CSV without a label column: only its image column is read.
    names = ["cat_0.png", "broken.png", "missing.png", "dog_0.png", "fox_0.png"]
    listing = write_csv(folder / "list.csv", [(n, "x") for n in names], header=("image", "note"))
    out = tmp_path / "pred.csv"
    assert run_predict(run_dir / "best.pt", listing, "--out", out, "--batch-size", "2", "--workers", "0") == 0

    assert [r["image"] for r in read_rows(out)] == ["cat_0.png", "dog_0.png", "fox_0.png"]
    err = capsys.readouterr().err
    assert "warning: skipping line 3 broken.png: not an image Pillow can read" in err  # its row of list.csv
    assert "warning: skipping line 4 missing.png:" in err
    assert "2 unreadable images skipped" in err


def test_missing_checkpoint_is_an_error_not_a_traceback(tiny_data, tmp_path, capsys):
    assert run_predict(tmp_path / "nope.pt", tiny_data[1], "--out", tmp_path / "pred.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "no such file" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "pred.csv").exists()


class _Payload:
    """Pickles as a call to open(path, 'w'): loading it would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_a_malicious_pickle_is_refused(tiny_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(marker)}, checkpoint)
    assert run_predict(checkpoint, tiny_data[1], "--out", tmp_path / "pred.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "not loaded, for safety" in err
    assert len(err.splitlines()) == 1 and "weights_only" not in err
    assert not marker.exists()


@pytest.mark.parametrize(
    "mistake", ["not_a_checkpoint", "wrong_checkpoint", "no_images", "no_image_column", "topk", "threshold"]
)
def test_user_mistakes_exit_2_with_one_line(mistake, untrained_checkpoint, tiny_data, tmp_path, capsys):
    checkpoint, inputs, extra = untrained_checkpoint, [tiny_data[1]], []
    if mistake == "not_a_checkpoint":
        checkpoint = tmp_path / "notes.pt"
        checkpoint.write_text("hello")
    elif mistake == "wrong_checkpoint":
        checkpoint = tmp_path / "state.pt"
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    elif mistake == "no_images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("no images here")
        inputs = [tmp_path / "empty"]
    elif mistake == "no_image_column":
        inputs = [write_csv(tmp_path / "list.csv", [("cat_0.png",)], header=("path",))]
    elif mistake == "threshold":
        extra = ["--threshold", "0.5"]  # a single-label model takes the most probable class, not a threshold
    else:
        extra = ["--topk", "0"]
    assert run_predict(checkpoint, *inputs, "--out", tmp_path / "pred.csv", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    expected = {
        "not_a_checkpoint": "not a PyTorch checkpoint",
        "wrong_checkpoint": "not a checkpoint written by train.py",
        "no_images": "no images found",
        "no_image_column": "no column 'image'",
        "topk": "--topk must be at least 1",
        "threshold": "--threshold is for multi-label models",
    }[mistake]
    assert expected in err
    assert not (tmp_path / "pred.csv").exists()


def test_predicts_with_an_untrained_checkpoint_in_train_format(untrained_checkpoint, tiny_data, tmp_path):
    """The checkpoint's own mean/std/size drive preprocessing; a missing resize_size falls back to size*256/224."""
    out = tmp_path / "pred.csv"
    assert run_predict(untrained_checkpoint, tiny_data[1] / "cat_0.png", "--out", out, "--workers", "0") == 0
    (row,) = read_rows(out)
    assert row["image"] == str(tiny_data[1] / "cat_0.png") and row["label"] in CLASSES
