"""Where the seconds of a short run go: `python train.py --epochs 2` on the bundled sample (168 training and 72
validation images, resnet34 at 224 px), stage by stage, in one process.

    python benchmarks/fixed_costs.py                           # the sample, 2 epochs, train.py's defaults
    python benchmarks/fixed_costs.py --extra="--cache off"     # any train.py flags added to the run

First the interpreter's start and `import train` are timed in fresh processes (best of 3), then one run is timed
in this process with a timer around each of train.py's stages (the functions main calls). The checkpoint
thread's writes are timed on their own: they overlap the next epoch, and only `wait for checkpoint writes`
is time the run spends on them. Whatever is not in a named stage is `other` (device choice, the parser, the
optimizer, printing).
"""

import argparse
import functools
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (module, function, what it does in the run), in the order main meets them
STAGES = [
    ("splits", "labelled_image_sets", "read the CSV, check every image, split"),
    ("duplicates", "checked", "duplicate check (hash every image)"),
    ("train", "build_datasets", "datasets and the RAM cache fill"),
    ("train", "build_model", "build resnet34"),
    ("train", "check_input_size", "one forward to check --image-size"),
    ("plots", "draw_batch", "train_batch.jpg (first picture: imports matplotlib)"),
    ("train", "train_one_epoch", "training epochs"),
    ("train", "evaluate", "validation passes"),
    ("run_files", "save_checkpoint", "checkpoints: copy to the CPU, queue for the thread"),
    ("report", "write_metrics", "metrics.csv"),
    ("plots", "draw_results", "results.png"),
    ("run_files", "wait_for_checkpoints", "wait for checkpoint writes"),
    ("report", "write_report", "final report: CSVs, confusion matrix, ROC, calibration, grid"),
    ("cam", "draw_val_cam", "val_cam.jpg (Grad-CAM of 32 images: imports captum)"),
    ("run_files", "write_split", "split.csv"),
    ("run_files", "write_args", "args.json"),
]


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the timed run")
    parser.add_argument("--extra", default="", help='train.py flags added to the run, e.g. --extra="--cache off"')
    return parser


def fresh_process_seconds(code):
    """Best of 3 wall-clock seconds of `python -c code` in the repository."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
        times.append(time.perf_counter() - started)
    return min(times)


def timed(function, totals, label, thread_totals=None):
    """`function` adding its wall-clock seconds to totals[label]; with `thread_totals`, only its calls on the
    checkpoint thread count, in thread_totals."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - started
            on_thread = threading.current_thread().name.startswith("checkpoint")
            if thread_totals is not None and on_thread:
                thread_totals[label] = thread_totals.get(label, 0.0) + seconds
            elif thread_totals is None:
                totals[label] = totals.get(label, 0.0) + seconds

    return wrapper


def main(opts):
    interpreter = fresh_process_seconds("pass")
    importing = fresh_process_seconds("import train") - interpreter
    sys.path.insert(0, str(REPO))
    import importlib

    totals, thread_totals = {}, {}
    for module_name, function_name, label in STAGES:
        module = importlib.import_module(module_name)
        setattr(module, function_name, timed(getattr(module, function_name), totals, label))
    run_files = importlib.import_module("run_files")
    run_files.write_atomically = timed(run_files.write_atomically, totals, "checkpoint writes", thread_totals)
    train = importlib.import_module("train")

    with tempfile.TemporaryDirectory(prefix="fixed-costs-") as folder:
        argv = ["--epochs", str(opts.epochs), "--output-dir", str(Path(folder) / "run"), *shlex.split(opts.extra)]
        print(f"python train.py {shlex.join(argv)}", flush=True)
        started = time.perf_counter()
        status = train.run_cli(argv)
        run_seconds = time.perf_counter() - started
        sizes = {p.name: p.stat().st_size for p in (Path(folder) / "run").glob("*.pt")}
    if status:
        raise SystemExit(f"train.py exited {status}")

    whole = interpreter + importing + run_seconds
    rows = [("python start-up", interpreter), ("import train (torch, torchvision, pandas, PIL, ...)", importing)]
    rows += [(label, totals[label]) for _, _, label in STAGES if label in totals]
    rows.append(("other", run_seconds - sum(totals.values())))
    width = max(len(label) for label, _ in rows)
    print(f"\n{'stage'.ljust(width)}  seconds  share")
    for label, seconds in rows:
        print(f"{label.ljust(width)}  {seconds:7.2f}  {seconds / whole:5.1%}")
    print(f"{'whole run'.ljust(width)}  {whole:7.2f}")
    written = ", ".join(f"{name} {size / 1e6:.0f} MB" for name, size in sorted(sizes.items()))
    print(f"\nthe checkpoint thread wrote for {thread_totals.get('checkpoint writes', 0.0):.2f} s ({written}), "
          "overlapped with the epochs except for `wait for checkpoint writes`")  # fmt: skip


if __name__ == "__main__":
    main(get_args_parser().parse_args())
