"""Shared fixtures: a tiny synthetic dataset written by the tests, and a way to run train.py in-process."""

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cam  # noqa: E402
import plots  # noqa: E402
import train  # noqa: E402

# Tiny models at 32 px spend more time dividing work between threads than computing; one thread is faster.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the runs tests start as processes

# Fast settings for CPU tests: a small model at a small size, no worker processes.
FAST = ["--model", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu"]


def make_image(path, label_index, rng, size=40, mode="RGB"):
    """A learnable image: the class decides which colour channel is bright."""
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    pixels[:, :, label_index % 3] += 150
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def read_rows(path):
    """A CSV file as a list of dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows, header=("image", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def tiny_data(tmp_path):
    """3 classes x 8 PNG images of 40x40 under tmp_path/images, listed in tmp_path/labels.csv."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for label_index, label in enumerate(["cat", "dog", "fox"]):
        for i in range(8):
            name = f"{label}_{i}.png"
            make_image(root / name, label_index, rng)
            rows.append((name, label))
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    return csv_path, root


def run_train(*argv):
    """Run train.py's command line in this process; returns its exit status."""
    return train.run_cli([str(a) for a in argv])


@pytest.fixture
def train_tiny(tiny_data, tmp_path):
    """Train on the tiny dataset with fast settings plus `extra` flags; returns (status, run directory)."""

    def run(*extra, output_dir=None):
        csv_path, root = tiny_data
        output_dir = output_dir or tmp_path / "run"
        status = run_train("--csv", csv_path, "--root", root, "--output-dir", output_dir, *FAST, *extra)
        return status, Path(output_dir)

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "pictures: the test draws the run's pictures (others skip them)")


@pytest.fixture(autouse=True)
def no_pictures(request, monkeypatch):
    """Drawing costs about a second per run, more than a tiny test epoch: only tests marked `pictures` draw."""
    if "pictures" not in request.keywords:
        for name in plots.DRAWINGS:
            monkeypatch.setattr(plots, name, lambda *args, **kwargs: None)
        monkeypatch.setattr(cam, "draw_val_cam", lambda *args, **kwargs: None)
