"""What a run leaves on disk and reads back: checkpoints, the run folder, split.csv, metrics.csv, the reports'
files, args.json and resume. The numbers of a report come from metrics.py, its pictures from plots.py.

train.py, predict.py and export.py all go through this module, so a checkpoint is written in one place
(`save_checkpoint`) and read in one place (`load_run_checkpoint`). Every file is written atomically: a crash,
`kill -9` or a full disk at any moment leaves the previous version of a file intact.
"""

import argparse
import copy
import hashlib
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import UsageError, one_line
from files import write_atomically, write_csv_atomically
from presets import resize_size_for

CHECKPOINT_VERSION = 1
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
    "subgroup_col",
    "tta",
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
    # checkpoints from before resize_size was saved: the rule they were trained with
    checkpoint.setdefault("resize_size", resize_size_for(checkpoint["image_size"]))
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
        # Other data named now replaces the run's own, its paths relative to its own folder unless --root says so;
        # subgroups are those asked for now (the run's columns need not exist in other data).
        saved = checkpoint["args"]
        named = next((name for name in ("csv", "data") if name in typed), None)
        if named and not same_file(getattr(args, named), saved.get(named)):
            args.csv, args.data = (args.csv, None) if named == "csv" else (None, args.data)
            args.root = args.root if "root" in typed else None
        if "subgroup_col" not in typed:
            args.subgroup_col = None
        source = next((getattr(args, name) for name in ("val_csv", "csv", "data") if name in typed), None)
        default_dir = Path(args.evaluate).parent / f"evaluate_{Path(source).stem if source else 'val'}"
        return checkpoint, Path(args.output_dir or default_dir)
    output_dir = choose_output_dir(args.output_dir, args.resume, here)
    if world_size > 1:
        shared = [str(output_dir)]
        torch.distributed.broadcast_object_list(shared, src=0)
        output_dir = Path(shared[0])
    return resume_checkpoint(args, typed, output_dir), output_dir


def same_file(path, other):
    """Whether two paths (either may be None) name the same file or folder."""
    return path is not None and other is not None and Path(path).resolve() == Path(other).resolve()


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


# -------------------------------------------------------------------------------------------- args.json


def write_args(output_dir, args, ctx, workers, split_method=None):
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
        "split_method": split_method,  # how validation was held out, as the console said
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    text = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
    write_atomically(Path(output_dir) / "args.json", lambda f: f.write(text.encode()))


class CheckpointSaver:
    """best.pt and last.pt of a run, decided in one place (as timm's CheckpointSaver): the best score so far
    in --best-metric's direction (loss: lower is better; an undefined score never wins), best.pt written
    before last.pt (a crash in between repeats the epoch, best.pt included), each on the checkpoint thread
    while the next epoch trains, by rank 0 only (torchvision's save_on_master)."""

    def __init__(self, output_dir, run, best_metric, is_main=True, checkpoint=None):
        self.output_dir, self.run, self.best_metric, self.is_main = Path(output_dir), run, best_metric, is_main
        self.best = dict(checkpoint["best"]) if checkpoint else {"score": None, "epoch": 0, "val_acc": 0.0}

    @property
    def best_path(self):
        return self.output_dir / "best.pt"

    def score_of(self, val_scores):
        score = -val_scores["val_loss"] if self.best_metric == "loss" else val_scores[f"val_{self.best_metric}"]
        return -math.inf if math.isnan(score) else score  # no AUC: no class with positives and negatives

    def epoch_done(self, epoch, val_scores, scored_model, history, last, thresholds=None):
        """Save the epoch's checkpoints; returns whether it is the new best. `last` holds last.pt's pieces
        (model, optimizer, scheduler, scaler, ema); `scored_model` is what was evaluated (the EMA with --ema)."""
        score = self.score_of(val_scores)
        improved = self.best["score"] is None or score > self.best["score"]
        if improved:
            self.best = {"score": score, "epoch": epoch, "val_acc": val_scores["val_acc"], "thresholds": thresholds}
            self._save(self.best_path, scored_model, epoch, history, thresholds=thresholds)
        self.save_last(epoch, history, last, thresholds)
        return improved

    def save_last(self, epoch, history, last, thresholds=None):
        """last.pt as of `epoch` completed epochs: --resume continues after it."""
        model, optimizer, scheduler, scaler, ema = last
        path = self.output_dir / "last.pt"
        self._save(path, model, epoch, history, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                   thresholds=thresholds, ema=ema)  # fmt: skip

    def _save(self, path, model, epoch, history, **pieces):
        if self.is_main:
            save_checkpoint(path, model, epoch, self.best, history, self.run, **pieces, background=True)

    def freeze_decision(self, temperature, operating_point):
        """Add what the model is deployed with, chosen on the validation images after training (decision.py),
        to best.pt: its temperature and operating point, rewritten atomically once the queued writes are done."""
        self.wait()
        if not self.is_main:
            return
        checkpoint = load_checkpoint(self.best_path, "best.pt")
        if checkpoint.get("temperature") == temperature and checkpoint.get("operating_point") == operating_point:
            return  # a finished run resumed: its best.pt stays as it was
        checkpoint.update(temperature=temperature, operating_point=operating_point)
        write_atomically(self.best_path, lambda f: torch.save(checkpoint, f))

    def wait(self):
        """Return once every checkpoint is on disk."""
        wait_for_checkpoints()
