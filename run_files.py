"""What a run leaves on disk and reads back: checkpoints, the run folder, split.csv, metrics.csv, the reports'
files, args.json and resume. The numbers of a report come from metrics.py, its pictures from plots.py.

train.py, predict.py and export.py all go through this module, so a checkpoint is written in one place
(`save_checkpoint`) and read in one place (`load_run_checkpoint`). Every file is written atomically: a crash,
`kill -9` or a full disk at any moment leaves the previous version of a file intact.
"""

import argparse
import copy
import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import metrics
from errors import UsageError, one_line
from files import write_atomically, write_csv_atomically

CHECKPOINT_VERSION = 1
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "val_macro_f1", "val_auc"]
LABEL_METRIC_COLUMNS = [*METRIC_COLUMNS, "val_map"]  # multi-label: val_acc is exact-match accuracy
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
    "label_sep",
    "label_cols",
    "uncertain",
    "threshold",
    "batch_size",
}
# Never taken from a saved run: where it lives and what to do with it, and the machine it continues on.
NOT_SAVED_FLAGS = {"resume", "output_dir", "evaluate", "device", "nproc"}


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
    multi_label: bool = False


def save_checkpoint(
    path,
    model,
    epoch,
    best,
    history,
    run,
    optimizer=None,
    scheduler=None,
    scaler=None,
    thresholds=None,
    ema=None,
    background=False,
):
    """Write a checkpoint atomically. With the optimizer (last.pt) it resumes training; without (best.pt)
    it is a third of the size and holds what predict.py, --evaluate and export.py need. A multi-label run's
    checkpoints hold the per-class `thresholds` of their epoch; with --ema, last.pt holds the average too.
    With `background`, it is written by the checkpoint thread (see `wait_for_checkpoints`)."""

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
        "multi_label": run.multi_label,
        "thresholds": thresholds,
        "version": CHECKPOINT_VERSION,
    }
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["scheduler"] = scheduler.state_dict()
        checkpoint["scaler"] = scaler.state_dict()
        if ema is not None:
            checkpoint["ema"] = ema.state_dict()
    if background:
        write_in_background(path, checkpoint)
    else:
        write_atomically(path, lambda f: torch.save(checkpoint, f))


# The ~340 MB of a resnet34's best.pt and last.pt take 1.4 s per epoch to reach the disk (measured on a 2-core
# cloud machine): one thread writes them while the next epoch trains, in the order they were saved (best.pt
# first), each atomically as before, so the folder always holds complete checkpoints, at most an epoch old.
_checkpoint_thread = None
_pending_writes = []


def write_in_background(path, checkpoint):
    """Queue `checkpoint` for the checkpoint thread, once at most one write is still waiting (an epoch's best.pt
    and last.pt in memory at a time). Its tensors are copied to the CPU first: training changes the weights and
    the optimizer state in place. A failed earlier write is raised here, or by wait_for_checkpoints."""
    global _checkpoint_thread
    from concurrent.futures import ThreadPoolExecutor

    while len(_pending_writes) > 1:
        _pending_writes.pop(0).result()
    copied = torch.utils._pytree.tree_map(
        lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x, checkpoint
    )
    if _checkpoint_thread is None:
        _checkpoint_thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
    _pending_writes.append(_checkpoint_thread.submit(write_atomically, path, lambda f: torch.save(copied, f)))


def wait_for_checkpoints():
    """Return once every checkpoint saved in the background is on disk; raise the first write that failed."""
    while _pending_writes:
        _pending_writes.pop(0).result()


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


def resume_checkpoint(args, typed, output_dir):
    """The checkpoint --resume continues from, with the run's saved settings applied to `args` (flags typed now
    must agree, except RESUMABLE_FLAGS); None for a new run. `--resume` alone with no last.pt yet starts a new
    run, so a restart can rerun the very same command line; a folder holding a run is never overwritten."""
    path = output_dir / "last.pt" if args.resume == "last" else Path(args.resume or "")
    if args.resume and (args.resume != "last" or path.exists()):
        checkpoint = load_run_checkpoint(path, "--resume", for_training=True)
        apply_saved_args(args, checkpoint["args"], typed, RESUMABLE_FLAGS)
        return checkpoint
    if holds_a_run(output_dir):
        raise UsageError(
            f"--output-dir {output_dir} already holds a run; add --resume to continue it, or choose another directory"
        )
    return None


def open_run(args, typed, here, world_size=1):
    """(checkpoint or None, run directory) of --evaluate, --resume or a new run, the saved run's settings
    applied to `args` (see apply_saved_args; `typed` are the flags given now). Under torchrun every process
    takes rank 0's run directory."""
    if args.evaluate:
        checkpoint = load_run_checkpoint(args.evaluate, "--evaluate")
        apply_saved_args(args, checkpoint["args"], typed, EVALUATE_FLAGS)
        if "amp" not in typed:  # the training run's autocast is not taken: inference is exact (fp32) unless asked
            args.amp = "off"
        return checkpoint, Path(args.output_dir or Path(args.evaluate).parent)
    output_dir = choose_output_dir(args.output_dir, args.resume, here)
    if world_size > 1:
        shared = [str(output_dir)]
        torch.distributed.broadcast_object_list(shared, src=0)
        output_dir = Path(shared[0])
    return resume_checkpoint(args, typed, output_dir), output_dir


def restore_training_state(checkpoint, model, optimizer, scheduler, scaler, ema=None):
    """Load last.pt's state into freshly built training pieces, for --resume."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"--resume: the checkpoint does not fit this model ({one_line(e)[:150]})") from None


def plain_args(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def typed_flags(parser, argv):
    """The flags typed in `argv`, as opposed to those left at their defaults."""
    parser = copy.deepcopy(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


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
    """split.csv: every image of every part ("train", "val", "test") with its label, and its group (patient)
    when the run has groups (--group-col, --group-pattern)."""
    rows = [
        dict(image=image, label=label, split=name, group=group)
        for name, samples in parts.items()
        if samples is not None
        for image, label, group in zip(samples["image"], samples["label"], samples.get("group", [None] * len(samples)))
    ]
    write_csv_atomically(output_dir / "split.csv", ["image", "label", "split", "group"], rows)


def write_metrics(output_dir, history):
    columns = LABEL_METRIC_COLUMNS if history and "val_map" in history[0] else METRIC_COLUMNS
    write_csv_atomically(output_dir / "metrics.csv", columns, history)


# ---------------------------------------------------------------------------------------------- reports


def write_report(output_dir, predictions, data, title, prefix="", thresholds=None):
    """The final report of a model on one part of the data (metrics.Predictions of the MyDataset `data`):
    printed, and saved as {prefix}report.csv, {prefix}confusion_matrix.csv, {val_|test_}predictions.csv and
    the pictures {prefix}confusion_matrix.png, {prefix}roc.png, {prefix}calibration.png, and for validation
    (no prefix) val_predictions.jpg. Multi-label: see write_label_report."""
    import plots  # here, not above: plots imports this module for its atomic writes

    if predictions.multi_label:
        return write_label_report(output_dir, predictions, data, title, prefix, thresholds)
    class_names = data.class_names
    rows, confusion = metrics.report(predictions, class_names)
    print(metrics.report_text(title, metrics.mean_loss(predictions), rows, confusion, class_names), flush=True)
    write_csv_atomically(output_dir / f"{prefix}report.csv", metrics.REPORT_COLUMNS, rows)
    header = ["true\\predicted", *class_names]
    matrix_rows = [dict(zip(header, [name, *counts])) for name, counts in zip(class_names, confusion.tolist())]
    write_csv_atomically(output_dir / f"{prefix}confusion_matrix.csv", header, matrix_rows)
    write_predictions(output_dir / f"{prefix or 'val_'}predictions.csv", predictions, data)

    plots.draw_confusion_matrix(output_dir, confusion, class_names, prefix)
    aucs = [row["auc"] for row in rows[: len(class_names)]]
    plots.draw_roc(output_dir, metrics.roc_curves(predictions), aucs, class_names, prefix)
    ece = next(row["value"] for row in rows if row["label"] == "ece")
    plots.draw_calibration(output_dir, metrics.calibration_bins(predictions), ece, prefix)
    if not prefix:
        plots.draw_predictions(output_dir, *plots.worth_seeing(predictions, data), class_names)


def write_predictions(path, predictions, data):
    """One row per evaluated image: image, label, predicted, confidence, then p_<class> for every class."""
    class_names = data.class_names
    header = ["image", "label", "predicted", "confidence", *(f"p_{name}" for name in class_names)]
    probabilities = predictions.probabilities.tolist()
    rows = [
        dict(zip(header, [data.images[i], class_names[t], class_names[p], max(probs), *probs]))
        for i, t, p, probs in zip(
            predictions.indices.tolist(), predictions.labels.tolist(), predictions.predicted.tolist(), probabilities
        )
    ]
    write_csv_atomically(path, header, rows)


def write_label_report(output_dir, predictions, data, title, prefix, thresholds):
    """write_report for a multi-label model at its per-class `thresholds`: {prefix}report.csv
    (LABEL_REPORT_COLUMNS), {val_|test_}predictions.csv, {prefix}pr_curves.png and {prefix}roc.png, and
    for validation val_predictions.jpg (true and predicted label sets)."""
    import plots

    class_names = data.class_names
    rows = metrics.label_report(predictions, class_names, thresholds)
    print(metrics.label_report_text(title, metrics.mean_loss(predictions), rows, class_names), flush=True)
    write_csv_atomically(output_dir / f"{prefix}report.csv", metrics.LABEL_REPORT_COLUMNS, rows)
    write_label_predictions(output_dir / f"{prefix or 'val_'}predictions.csv", predictions, data, thresholds)
    per_class = rows[: len(class_names)]
    plots.draw_pr_curves(output_dir, metrics.pr_curves(predictions), [row["ap"] for row in per_class], class_names,
                         prefix)  # fmt: skip
    plots.draw_roc(output_dir, metrics.roc_curves(predictions), [row["auc"] for row in per_class], class_names, prefix)
    if not prefix:
        plots.draw_label_sets(output_dir, *plots.label_sets_worth_seeing(predictions, thresholds, data), class_names)


def write_label_predictions(path, predictions, data, thresholds):
    """One row per evaluated image: image, labels (true, 'a;b', empty for none), predicted (the same), then
    p_<class> for every class."""
    class_names = data.class_names
    header = ["image", "labels", "predicted", *(f"p_{name}" for name in class_names)]
    chosen = metrics.predicted_sets(predictions, thresholds).tolist()
    rows = []
    for i, true, predicted, probabilities in zip(
        predictions.indices.tolist(), predictions.labels.tolist(), chosen, predictions.probabilities.tolist()
    ):
        true_names = ";".join(name for name, t in zip(class_names, true) if t == 1)
        predicted_names = ";".join(name for name, p in zip(class_names, predicted) if p)
        rows.append(dict(zip(header, [data.images[i], true_names, predicted_names, *probabilities])))
    write_csv_atomically(path, header, rows)


# ------------------------------------------------------------------------------------- cross-validation

CV_SCORES = ("accuracy", "macro f1", "macro auc", "map", "exact match")  # those a report has


def write_cv_summary(output_dir, folds):
    """After --folds K: cv_summary.csv (each fold's validation scores, and test scores when there is a test
    set, with their mean and sample standard deviation), cv_predictions.csv (every image's out-of-fold
    prediction, with its fold), and the same summary on the console."""
    import csv
    import statistics

    def read(path):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    fold_dirs = [Path(output_dir) / f"fold{k}" for k in range(1, folds + 1)]
    rows, lines = [], []
    for part, prefix in (("val", ""), ("test", "test_")):
        if not all((d / f"{prefix}report.csv").exists() for d in fold_dirs):
            continue
        reports = [{row["label"]: row["value"] for row in read(d / f"{prefix}report.csv")} for d in fold_dirs]
        for score in (score for score in CV_SCORES if score in reports[0]):
            values = [float(report[score]) if report.get(score) else float("nan") for report in reports]
            defined = [v for v in values if v == v]
            mean = statistics.fmean(defined) if defined else float("nan")
            sd = statistics.stdev(defined) if len(defined) > 1 else float("nan")
            rows.append({"metric": f"{part} {score}", **{f"fold{k}": v for k, v in enumerate(values, 1)},
                         "mean": mean, "sd": sd})  # fmt: skip
            lines.append(f"{part} {score} {mean:.3f} ± {sd:.3f}")
    header = ["metric", *(f"fold{k}" for k in range(1, folds + 1)), "mean", "sd"]
    write_csv_atomically(Path(output_dir) / "cv_summary.csv", header, rows)
    predictions = [dict(row, fold=k) for k, d in enumerate(fold_dirs, 1) for row in read(d / "val_predictions.csv")]
    columns = ["fold", *(key for key in predictions[0] if key != "fold")]
    write_csv_atomically(Path(output_dir) / "cv_predictions.csv", columns, predictions)
    print(f"\ncross-validation, {folds} folds (mean ± sd over folds): " + ", ".join(lines))
    print(f"{output_dir / 'cv_summary.csv'}, {output_dir / 'cv_predictions.csv'}: {len(predictions)} images, each once")


# -------------------------------------------------------------------------------------------- args.json


def write_args(output_dir, args, ctx, workers):
    """args.json: every flag as the run uses it, and what the script chose for this machine, as timm and
    Ultralytics write args.yaml."""
    import json

    import torchvision

    settings = {
        **plain_args(args),
        "device": str(ctx.device),
        "precision": "fp32" if ctx.amp_dtype is None else str(ctx.amp_dtype).removeprefix("torch."),
        "channels_last": ctx.channels_last,
        "processes": ctx.world_size,
        "workers": workers,
        "global_batch": args.batch_size * args.accum_steps * ctx.world_size,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    text = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
    write_atomically(Path(output_dir) / "args.json", lambda f: f.write(text.encode()))
