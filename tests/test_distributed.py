"""Two processes on the CPU under torchrun (gloo), as on two GPUs."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import FAST, read_rows, run_train

TESTS = Path(__file__).resolve().parent


def test_two_processes_train_one_model_and_count_every_validation_image_once(tiny_data, tmp_path):
    csv_path, root = tiny_data
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(TESTS / "ddp_worker.py"),
        "--csv",
        str(csv_path),
        "--root",
        str(root),
        "--output-dir",
        str(run_dir),
        *FAST,
        "--epochs",
        "2",
        "--amp",
        "off",
    ]
    env = dict(os.environ, WEIGHTS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("epoch 2/2  train_loss") == 1  # only rank 0 prints
    assert "(global 16)" in finished.stdout

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    val_images = sum(row["split"] == "val" for row in read_rows(run_dir / "split.csv"))
    report = {row["label"]: row for row in read_rows(run_dir / "report.csv")}
    assert int(report["accuracy"]["support"]) == val_images

    assert run_train("--evaluate", run_dir / "best.pt", "--output-dir", tmp_path / "single") == 0
    single = {row["label"]: row for row in read_rows(tmp_path / "single" / "report.csv")}
    assert single["accuracy"]["f1"] == report["accuracy"]["f1"]
