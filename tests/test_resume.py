"""Checkpoints that survive anything, and runs that resume exactly."""

import csv
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_train

import files

REPO = Path(__file__).resolve().parents[1]


def metric_rows(run_dir):
    """metrics.csv without the wall-clock column, which no two runs share."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_runs_with_the_same_seed_are_bitwise_equal(train_tiny, tmp_path):
    assert train_tiny("--epochs", "2", output_dir=tmp_path / "a")[0] == 0
    assert train_tiny("--epochs", "2", output_dir=tmp_path / "b")[0] == 0
    assert_same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")


def test_stopping_after_two_epochs_and_resuming_to_four_equals_four_straight(train_tiny, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_tiny("--epochs", "4", output_dir=straight)[0] == 0
    assert train_tiny("--epochs", "2", output_dir=resumed)[0] == 0
    assert run_train("--output-dir", resumed, "--resume", "--epochs", "4") == 0
    assert_same_weights(weights(straight / "last.pt"), weights(resumed / "last.pt"))
    assert metric_rows(straight) == metric_rows(resumed)
    assert torch.load(resumed / "last.pt", weights_only=True)["epoch"] == 4


def test_resuming_a_finished_run_again_changes_nothing(train_tiny, tmp_path):
    run_dir = tmp_path / "run"
    assert train_tiny("--epochs", "2", output_dir=run_dir)[0] == 0
    before = weights(run_dir / "last.pt")
    assert run_train("--output-dir", run_dir, "--resume") == 0
    assert run_train("--output-dir", run_dir, "--resume") == 0
    assert_same_weights(before, weights(run_dir / "last.pt"))
    assert [row["epoch"] for row in metric_rows(run_dir)] == ["1", "2"]


def test_resume_alone_starts_fresh_when_there_is_no_last_checkpoint(train_tiny, tmp_path):
    status, run_dir = train_tiny("--epochs", "1", "--resume", output_dir=tmp_path / "new")
    assert status == 0
    assert (run_dir / "last.pt").is_file()


def test_resume_refuses_a_changed_training_flag(train_tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_tiny("--epochs", "1", output_dir=run_dir)[0] == 0
    assert run_train("--output-dir", run_dir, "--resume", "--lr", "0.1") == 2
    assert "--lr" in capsys.readouterr().err


def test_resume_refuses_a_csv_that_no_longer_gives_the_same_split(train_tiny, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_tiny("--epochs", "1", output_dir=run_dir)[0] == 0
    csv_path = tiny_data[0]
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:-1]) + "\n")
    assert run_train("--output-dir", run_dir, "--resume", "--epochs", "2") == 2
    assert "split" in capsys.readouterr().err


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    files.write_atomically(target, lambda f: torch.save({"epoch": 1}, f))

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(files.WriteError, match="No space left"):
        files.write_atomically(target, lambda f: torch.save({"epoch": 2}, f))
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stale_temp_files_from_a_killed_run_are_removed_at_the_next_start(train_tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".last.pt.12345.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train_tiny("--epochs", "1", output_dir=run_dir)[0] == 0
    assert not stale.exists()


def test_every_file_written_loads_with_weights_only(train_tiny):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    for name in ("best.pt", "last.pt"):
        assert isinstance(torch.load(run_dir / name, weights_only=True), dict)


def training_command(tiny_data, run_dir, *extra):
    csv_path, root = tiny_data
    return [
        sys.executable,
        str(REPO / "tests" / "train_without_pictures.py"),
        "--csv",
        str(csv_path),
        "--root",
        str(root),
        "--output-dir",
        str(run_dir),
        *FAST,
        *extra,
    ]


def start_training(tiny_data, run_dir, *extra):
    command = training_command(tiny_data, run_dir, *extra)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def printed(process, text, timeout=120):
    """Wait until the process prints a line containing `text`; False if it ends first."""
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if text in line:
            return True
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s"
    return False


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_last_checkpoint_and_exits_with_its_status(tiny_data, tmp_path, signum, status):
    run_dir = tmp_path / "run"
    process = start_training(tiny_data, run_dir, "--epochs", "500", "--workers", "1")
    assert printed(process, "epoch 1/500")
    sent = time.monotonic()
    process.send_signal(signum)
    time.sleep(0.2)
    process.send_signal(signum)  # a second one, impatient, while the first is being handled
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert time.monotonic() - sent < 20
    assert "--resume" in stderr and "Traceback" not in stderr
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] >= 1


def test_kill_9_at_random_moments_never_leaves_an_unloadable_checkpoint(tiny_data, tmp_path):
    """Kill the run hard several times, just after an epoch ends or during the next one (its save included),
    resuming each time: last.pt always loads, and the result equals an uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    epochs = "4"
    # The uninterrupted run in this process: the same flags, without the interpreter and script ([2:]).
    assert run_train(*training_command(tiny_data, straight, "--epochs", epochs)[2:]) == 0
    rng = random.Random(0)
    kills = 0
    for _ in range(2):  # two kills, each resumed; every kill costs a process start (~6 s)
        process = start_training(tiny_data, killed, "--epochs", epochs, "--resume")
        if not printed(process, "train_loss"):
            break  # the run finished before this kill
        time.sleep(rng.uniform(0.0, 0.4))
        process.kill()
        process.communicate()
        kills += 1
        torch.load(killed / "last.pt", weights_only=True)  # must always load
        torch.load(killed / "best.pt", weights_only=True)
    assert kills == 2
    finish = subprocess.run(training_command(tiny_data, killed, "--epochs", epochs, "--resume"), capture_output=True)
    assert finish.returncode == 0, finish.stderr
    assert_same_weights(weights(straight / "last.pt"), weights(killed / "last.pt"))
    assert metric_rows(straight) == metric_rows(killed)
