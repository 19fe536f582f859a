"""Two processes on the CPU (gloo), as on two GPUs: under torchrun, and launched by train.py --nproc itself."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, make_image, read_rows, run_train, write_csv
from test_bad_input import truncate_after_header

import train

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DDP = [*FAST, "--epochs", "2", "--amp", "off"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 8 images and their CSV, shared by the runs of this module."""
    folder = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    rows = []
    for index, label in enumerate(["cat", "dog", "fox"]):
        for i in range(8):
            make_image(folder / "images" / f"{label}_{i}.png", index, rng)
            rows.append((f"{label}_{i}.png", label))
    return write_csv(folder / "labels.csv", rows), folder / "images", folder


@pytest.fixture(scope="module")
def torchrun_run(data):
    """A 2-process run under torchrun that also saves each rank's weights (tests/ddp_worker.py)."""
    csv_path, root, folder = data
    run_dir = folder / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(TESTS / "ddp_worker.py"), "--csv", csv_path, "--root", root, "--output-dir", run_dir, *DDP]
    env = dict(ENV, WEIGHTS_DIR=str(folder))
    finished = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished, run_dir


def metric_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_two_processes_train_one_model_and_count_every_validation_image_once(torchrun_run, data, tmp_path):
    finished, run_dir = torchrun_run
    assert finished.stdout.count("epoch 2/2  train_loss") == 1  # only rank 0 prints
    assert "(global 16)" in finished.stdout

    rank0, rank1 = (torch.load(data[2] / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    val_images = sum(row["split"] == "val" for row in read_rows(run_dir / "split.csv"))
    report = {row["label"]: row for row in read_rows(run_dir / "report.csv")}
    assert int(report["accuracy"]["support"]) == val_images

    assert run_train("--evaluate", run_dir / "best.pt", "--output-dir", tmp_path / "single") == 0
    single = {row["label"]: row for row in read_rows(tmp_path / "single" / "report.csv")}
    assert single["accuracy"]["value"] == report["accuracy"]["value"]


def test_predictions_gathered_from_two_processes_equal_one_process_row_for_row(torchrun_run, tmp_path):
    _, run_dir = torchrun_run
    assert run_train("--evaluate", run_dir / "best.pt", "--output-dir", tmp_path / "single") == 0
    gathered = read_rows(run_dir / "val_predictions.csv")
    single = read_rows(tmp_path / "single" / "val_predictions.csv")
    val_images = [row["image"] for row in read_rows(run_dir / "split.csv") if row["split"] == "val"]
    assert [row["image"] for row in gathered] == val_images  # each image once, in dataset order
    for a, b in zip(gathered, single, strict=True):
        assert a.keys() == b.keys() and a["image"] == b["image"] and a["predicted"] == b["predicted"]
        assert all(abs(float(a[k]) - float(b[k])) < 1e-5 for k in a if k.startswith("p_"))


def run_nproc(*argv, **kwargs):
    command = [sys.executable, str(REPO / "train.py"), "--nproc", "2", "--device", "cpu", *argv]
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=ENV, timeout=600, **kwargs)


def test_nproc_trains_like_torchrun_with_one_set_of_outputs(torchrun_run, data):
    csv_path, root, folder = data
    finished = run_nproc("--csv", csv_path, "--root", root, "--output-dir", folder / "nproc", *DDP)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("epoch 2/2  train_loss") == 1
    assert finished.stdout.count("device cpu, 2 processes") == 1
    assert metric_rows(folder / "nproc") == metric_rows(torchrun_run[1])


def test_nproc_a_bad_image_in_one_process_ends_the_run_with_its_name(data, tmp_path):
    csv_path, root, _ = data
    make_image(root / "broken.png", 0, np.random.default_rng(2), size=64)
    truncate_after_header(root / "broken.png")
    rows = [(r["image"], r["label"]) for r in read_rows(csv_path)] + [("broken.png", "cat")]
    bad_csv = write_csv(tmp_path / "bad.csv", rows)
    finished = run_nproc("--csv", bad_csv, "--root", root, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1")
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error:")]
    assert any("broken.png" in line for line in errors), finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr


def test_nproc_ctrl_c_stops_both_processes_and_saves_a_loadable_last_pt(data, tmp_path):
    csv_path, root, _ = data
    run_dir = tmp_path / "run"
    argv = ["--csv", csv_path, "--root", root, "--output-dir", run_dir, *FAST, "--epochs", "50", "--batch-size", "2"]
    command = [sys.executable, str(REPO / "train.py"), "--nproc", "2", "--device", "cpu", *argv]
    process = subprocess.Popen(
        [str(c) for c in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] >= 1
    assert err.count("continue with: python train.py --nproc 2") == 1


@pytest.mark.parametrize(
    "exit_codes, status",
    [
        ({0: -15, 1: 2}, 2),  # the failing process's own status, though the launcher stopped the other first
        ({0: 1, 1: -9}, 137),  # killed (the OOM killer), the other one's collective broke
        ({0: -15, 1: 1}, 1),  # a crash; the launcher's SIGTERM to the other says nothing
    ],
)
def test_nproc_exits_with_the_status_that_says_what_went_wrong(monkeypatch, exit_codes, status):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.launcher import api

    def launch(config, entrypoint):
        def run(*args):
            failures = {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in exit_codes.items()}
            raise ChildFailedError("train.py", failures)

        return run

    monkeypatch.setattr(api, "elastic_launch", launch)
    assert train.launch_processes(2, []) == status


@pytest.mark.parametrize(
    "device, gpus, expected", [("auto", 4, 4), ("cuda", 2, 2), ("cuda:0", 4, 1), ("cpu", 4, 1), ("auto", 1, 1)]
)
def test_every_visible_gpu_is_used_by_default(monkeypatch, device, gpus, expected):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    args = train.get_args_parser().parse_args(["--device", device])
    assert train.processes_to_launch(args) == expected


def test_lr_find_runs_in_one_process_on_a_machine_with_several_gpus(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert train.processes_to_launch(train.get_args_parser().parse_args(["--lr-find"])) == 1


def test_the_default_launch_is_announced_with_how_to_use_one_gpu(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    launched = []
    monkeypatch.setattr(train, "launch_processes", lambda nproc, argv: launched.append(nproc) or 0)
    assert run_train("--batch-size", "8") == 0
    assert launched == [4]
    out = capsys.readouterr().out
    assert "--device cuda:0" in out and "global batch 32" in out
