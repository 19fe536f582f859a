"""What a run leaves on disk and reads back: checkpoints, the run folder, split.csv, metrics and reports.

train.py, predict.py and export.py all go through this module, so a checkpoint is written in one place
(`save_checkpoint`) and read in one place (`load_run_checkpoint`). Every file is written atomically: a crash,
`kill -9` or a full disk at any moment leaves the previous version of a file intact.
"""

import hashlib
import os
import re
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "val_macro_f1"]
# Flags that may differ when a run is resumed; every other flag is taken from the checkpoint.
RESUMABLE_FLAGS = {"epochs", "workers", "device", "amp", "compile", "cache", "skip_bad_images", "patience", "nproc"}
# Flags that --evaluate may take from the command line instead of the checkpoint: the data and the runtime.
EVALUATE_FLAGS = RESUMABLE_FLAGS | {
    "csv",
    "root",
    "data",
    "val_csv",
    "val_root",
    "image_col",
    "label_col",
    "batch_size",
}
# Never taken from a saved run: where it lives and what to do with it, and the machine it continues on.
NOT_SAVED_FLAGS = {"resume", "output_dir", "evaluate", "device", "nproc"}


class UsageError(Exception):
    """A bad flag or an impossible request. The message is meant for the user, as one line."""


def one_line(error):
    """The first line of an exception's message, for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------ atomic writes


def write_atomically(path, write):
    """Call write(f) on a temporary file in the same folder, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UsageError(f"could not write {path}: {e.strerror or e}; earlier files there are intact") from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_csv_atomically(path, header, rows):
    lines = [",".join(header)] + [",".join(_csv_field(row[c]) for c in header) for row in rows]
    write_atomically(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def _csv_field(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


# ------------------------------------------------------------------------------------------- run folder


def choose_output_dir(output_dir, resume, here):
    """--output-dir, else the run --resume names, else a new runs/expN (under `here` when run from there)."""
    if output_dir:
        return Path(output_dir)
    runs = here / "runs" if Path.cwd() == here else Path("runs")
    numbers = [int(m.group(1)) for p in runs.glob("exp*") if (m := re.fullmatch(r"exp(\d+)", p.name))]
    if resume == "last":
        if numbers:
            return runs / f"exp{max(numbers)}"
    elif resume:
        return Path(resume).parent
    return runs / f"exp{max(numbers, default=0) + 1}"


def make_output_dir(output_dir):
    """Create the run folder and remove the temporary files a killed run left behind."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {output_dir}: cannot create it ({e.strerror or e})") from None
    for stale in Path(output_dir).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def holds_a_run(output_dir):
    return any((Path(output_dir) / name).exists() for name in ("last.pt", "best.pt"))


# ------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class RunInfo:
    """What every checkpoint of a run carries besides its weights: enough to rebuild, resume and deploy it."""

    args: dict  # the run's settings, plain values only
    class_names: list
    mean: tuple
    std: tuple
    resize_size: int
    split_digest: str


def save_checkpoint(path, model, epoch, best, history, run, optimizer=None, scheduler=None, scaler=None):
    """Write a checkpoint atomically. With the optimizer (last.pt) it resumes training; without (best.pt)
    it is a third of the size and holds what predict.py, --evaluate and export.py need."""
    checkpoint = {
        "model": model.state_dict(),
        "epoch": epoch,
        "best": dict(best),
        "best_acc": best["val_acc"],
        "history": list(history),
        "class_names": list(run.class_names),
        "model_name": run.args["model"],
        "image_size": run.args["image_size"],
        "resize_size": run.resize_size,
        "mean": list(run.mean),
        "std": list(run.std),
        "args": dict(run.args),
        "split_digest": run.split_digest,
        "version": CHECKPOINT_VERSION,
    }
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["scheduler"] = scheduler.state_dict()
        checkpoint["scaler"] = scaler.state_dict()
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, flag):
    """torch.load with weights_only=True: a file holding anything but tensors and plain values is refused."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing a file
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if path.stat().st_size == 0:
            reason = "the file is empty"
        elif "GLOBAL" in str(e) or "Unsupported global" in str(e):
            reason = "not a plain checkpoint of tensors; Python objects in it are not loaded, for safety"
        elif "Weights only load failed" in str(e):
            reason = "not a PyTorch checkpoint of tensors (its data is damaged, or unsafe to load)"
        else:
            reason = "truncated, or not a PyTorch checkpoint at all"
        raise UsageError(f"{flag} {path}: {reason}") from None


# What rebuilding and using a trained model needs; resuming also needs the training state.
MODEL_KEYS = ("model", "model_name", "class_names", "image_size", "mean", "std")
TRAINING_KEYS = ("args", "epoch", "best", "history", "optimizer", "scheduler", "scaler")


def load_run_checkpoint(path, flag, for_training=False):
    """A checkpoint that train.py wrote (best.pt or last.pt), checked to hold what rebuilding the model needs,
    and with `for_training` what resuming needs."""
    checkpoint = load_checkpoint(path, flag)
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in MODEL_KEYS):
        raise UsageError(f"{flag} {path}: not a checkpoint written by train.py")
    if for_training and not all(key in checkpoint for key in TRAINING_KEYS):
        raise UsageError(f"{flag} {path}: holds the weights only (best.pt); resume from the run's last.pt")
    checkpoint.setdefault("resize_size", int(checkpoint["image_size"] * 256 / 224))
    checkpoint.setdefault("args", {})
    return checkpoint


def plain_args(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def apply_saved_args(args, saved_args, typed, may_differ):
    """Take a saved run's settings: flags in `may_differ` typed now override them; others must not differ."""
    for name, value in saved_args.items():
        if name in NOT_SAVED_FLAGS or not hasattr(args, name):
            continue
        if name in typed:
            if name not in may_differ and getattr(args, name) != value:
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"{flag} {getattr(args, name)} differs from the saved run's {value}; drop it or start a new run"
                )
            continue
        setattr(args, name, value)


# ------------------------------------------------------------------------------------------------ split


def split_digest(train_samples, val_samples):
    """A fingerprint of the split, so a resumed run can tell that it trains on the same images."""
    text = "\n".join(f"{p}\t{label}\ttrain" for p, label in zip(train_samples["image"], train_samples["label"]))
    text += "\n" + "\n".join(f"{p}\t{label}\tval" for p, label in zip(val_samples["image"], val_samples["label"]))
    return hashlib.sha256(text.encode()).hexdigest()


def write_split(output_dir, parts):
    """split.csv: every image of every part ("train", "val", "test") with its label."""
    rows = [
        dict(image=image, label=label, split=name)
        for name, samples in parts.items()
        if samples is not None
        for image, label in zip(samples["image"], samples["label"])
    ]
    write_csv_atomically(output_dir / "split.csv", ["image", "label", "split"], rows)


def write_metrics(output_dir, history):
    write_csv_atomically(output_dir / "metrics.csv", METRIC_COLUMNS, history)


# ---------------------------------------------------------------------------------------------- reports


def per_class_scores(confusion):
    """Precision, recall and F1 per class; 0 where a class has no support or no predictions."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = true_positive / predicted.clamp(min=1)
    recall = true_positive / support.clamp(min=1)
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    return support, precision, recall, f1


def macro_f1(confusion):
    """Mean F1 over the classes present in the evaluated data."""
    support, _, _, f1 = per_class_scores(confusion)
    present = support > 0
    return f1[present].mean().item() if present.any() else 0.0


def classification_report(stats, class_names):
    """Rows of report.csv: one per class, macro and weighted averages (over classes present), accuracy, top-k."""
    support, precision, recall, f1 = per_class_scores(stats["confusion"])
    rows = [
        dict(label=name, support=int(n), precision=p, recall=r, f1=f)
        for name, n, p, r, f in zip(class_names, support.tolist(), precision.tolist(), recall.tolist(), f1.tolist())
    ]
    present = support > 0
    if present.any():
        weights = support[present] / support[present].sum()
        averages = {
            "macro avg": lambda x: x[present].mean().item(),
            "weighted avg": lambda x: (x[present] * weights).sum().item(),
        }
        for name, average in averages.items():
            rows.append(
                dict(
                    label=name,
                    support=int(support.sum()),
                    precision=average(precision),
                    recall=average(recall),
                    f1=average(f1),
                )
            )
    rows.append(dict(label="accuracy", support=stats["count"], precision="", recall="", f1=stats["val_acc"]))
    for k, accuracy in stats["topk_acc"].items():
        rows.append(dict(label=f"top{k} accuracy", support=stats["count"], precision="", recall="", f1=accuracy))
    return rows


def display_width(text):
    """Columns `text` takes in a terminal: wide (CJK) characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in str(text)
    )


def pad(text, width):
    """Right-align `text` in `width` terminal columns."""
    return " " * max(0, width - display_width(text)) + str(text)


def write_report(output_dir, stats, class_names, title, prefix=""):
    """Print the per-class report and confusion matrix; save them as {prefix}report.csv and
    {prefix}confusion_matrix.csv."""
    rows = classification_report(stats, class_names)
    width = max(12, *(display_width(row["label"]) for row in rows))
    print(f"\n{title}: {stats['count']} images, loss {stats['val_loss']:.3f}")
    print(f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}")
    for row in rows:
        cells = [
            f"{row[c]:9.3f}" if isinstance(row[c], float) else f"{row[c]:>9}" for c in ("precision", "recall", "f1")
        ]
        print(f"{pad(row['label'], width)}  {'  '.join(cells)}  {row['support']:>7}")
    confusion = stats["confusion"].tolist()
    cell = max(5, *(display_width(name) for name in class_names))
    print(
        f"\nconfusion matrix (rows: true, columns: predicted)\n{'':>{width}}  "
        + "  ".join(pad(n, cell) for n in class_names)
    )
    for name, counts in zip(class_names, confusion):
        print(f"{pad(name, width)}  " + "  ".join(f"{c:>{cell}}" for c in counts))
    sys.stdout.flush()
    write_csv_atomically(output_dir / f"{prefix}report.csv", ["label", "support", "precision", "recall", "f1"], rows)
    matrix_rows = [
        {"true\\predicted": name, **dict(zip(class_names, counts))} for name, counts in zip(class_names, confusion)
    ]
    write_csv_atomically(output_dir / f"{prefix}confusion_matrix.csv", ["true\\predicted", *class_names], matrix_rows)
