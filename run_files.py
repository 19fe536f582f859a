"""What a run leaves on disk and reads back: checkpoints, the run folder, split.csv, metrics and reports.

train.py, predict.py and export.py all go through this module, so a checkpoint is written in one place
(`save_checkpoint`) and read in one place (`load_run_checkpoint`). Every file is written atomically: a crash,
`kill -9` or a full disk at any moment leaves the previous version of a file intact.
"""

import argparse
import copy
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


def load_state_dict(path, flag):
    """The weights in a local file: a plain state dict, or the model of one of our checkpoints. The prefixes
    that DDP and torch.compile add to the names ('module.', '_orig_mod.') are removed."""
    state = load_checkpoint(path, flag)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{flag} {path}: not a state dict of tensors")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def load_weights_file(model, path, head_name, model_name):
    """Load --weights, a local state dict (or one of our checkpoints), into `model`, all but a head (the layer
    `head_name`) of another shape: the head is replaced anyway, a different class count must not stop fine-tuning."""
    state, own = load_state_dict(path, "--weights"), model.state_dict()
    head = head_name + "."
    state = {k: v for k, v in state.items() if not (k.startswith(head) and k in own and v.shape != own[k].shape)}
    problems = [f"missing {k}" for k in own if k not in state and not k.startswith(head)]
    problems += [
        f"unexpected {k}" for k in state if k not in own and not k.startswith(("AuxLogits.", "aux1.", "aux2."))
    ]
    problems += [f"shape of {k}" for k in state if k in own and state[k].shape != own[k].shape]
    if problems:
        raise UsageError(f"--weights {path}: does not fit {model_name} ({problems[0]}); is it for another --model?")
    model.load_state_dict(state, strict=False)


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
        return checkpoint, Path(args.output_dir or Path(args.evaluate).parent)
    output_dir = choose_output_dir(args.output_dir, args.resume, here)
    if world_size > 1:
        shared = [str(output_dir)]
        torch.distributed.broadcast_object_list(shared, src=0)
        output_dir = Path(shared[0])
    return resume_checkpoint(args, typed, output_dir), output_dir


def restore_training_state(checkpoint, model, optimizer, scheduler, scaler):
    """Load last.pt's state into freshly built training pieces, for --resume."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
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
    """Print the per-class report and confusion matrix; save them as {prefix}report.csv,
    {prefix}confusion_matrix.csv and the picture {prefix}confusion_matrix.png."""
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
    draw_confusion_matrix(output_dir, stats["confusion"], class_names, prefix)


# ---- pictures
#
# What a person looks at before the numbers: results.png (curves), confusion_matrix.png, val_predictions.jpg and
# train_batch.jpg, plus args.json. A picture is never worth a run: every draw_* function catches its own failure
# (matplotlib missing, an odd value, a full disk), prints one warning line and returns False. matplotlib is
# imported only when drawing, so `import run_files` stays fast for predict.py and export.py and works without it.
# Figures are plain matplotlib Figure objects on the Agg canvas, never pyplot: no display is needed, no global
# backend is switched in the caller's process, and nothing stays registered in memory after a picture is saved.

PICTURE_DPI = 100
GRID_CELL = 128  # pixels of an image in the prediction and batch grids
GRID_COLUMNS = 8
RIGHT_COLOUR, WRONG_COLOUR = (26, 127, 55), (207, 34, 46)  # green and red; captions also carry ✓ / ✗
# Warnings already printed: a picture that fails every epoch, or class names no font has, say so once.
_warned = set()
_font_characters = {}  # font file -> the code points it has glyphs for


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _save_picture(path, draw, class_names=()):
    """Save the Figure that draw(labels) returns as `path` (.png or .jpg), atomically.

    `labels` are the class names as text, or the class numbers when no installed font has their characters.
    Any failure becomes one warning line and False: a picture must never stop training.
    """
    path = Path(path)
    try:
        import io

        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        families, labels = _class_labels(class_names)
        # parse_math off: a class named "$5 note" is text, not TeX
        with matplotlib.rc_context({"font.family": families, "font.size": 9, "text.parse_math": False}):
            figure = draw(labels)
            FigureCanvasAgg(figure)
            buffer = io.BytesIO()
            options = {"pil_kwargs": {"quality": 85}} if path.suffix == ".jpg" else {}
            figure.savefig(buffer, format=path.suffix[1:], dpi=PICTURE_DPI, **options)
        write_atomically(path, lambda f: f.write(buffer.getvalue()))
        return True
    except Exception as e:
        reason = f"{type(e).__name__}: {one_line(e)}"
        _warn_once((path.name, reason), f"could not draw {path.name} ({reason})")
        return False


# ------------------------------------------------------------------------------------------------- fonts


def _characters_of(font_path):
    """The code points a font file has glyphs for (empty when it cannot be read); read once per file."""
    from matplotlib.ft2font import FT2Font

    if font_path not in _font_characters:
        try:
            _font_characters[font_path] = frozenset(FT2Font(font_path).get_charmap())
        except Exception:
            _font_characters[font_path] = frozenset()
    return _font_characters[font_path]


def _fonts_for(text):
    """Font families that together have every character of `text`: DejaVu Sans (matplotlib's own) first, then
    installed fonts for what it lacks (matplotlib falls back glyph by glyph along the list); None when some
    character is in no installed font."""
    from matplotlib import font_manager

    needed = {ord(c) for c in text if c.isprintable() and not c.isspace()}
    missing = needed - _characters_of(font_manager.findfont("DejaVu Sans"))
    families = ["DejaVu Sans"]
    for font in font_manager.fontManager.ttflist:
        if not missing:
            break
        if font.name.startswith("Last Resort"):  # matplotlib's own: "has" every character, as a box
            continue
        has = missing & _characters_of(font.fname)
        if has and font.name not in families:
            families.append(font.name)
            missing -= has
    return None if missing else families


def _class_labels(class_names):
    """(font families, labels): the class names in a font that has them, else class numbers, with the key
    printed once. Without this, matplotlib draws Chinese names as empty boxes."""
    names = [str(name) for name in class_names]
    families = _fonts_for("".join(names)) if names else ["DejaVu Sans"]
    if families is not None:
        return families, names
    key = ", ".join(f"{i}={name}" for i, name in enumerate(names))
    _warn_once(
        ("fonts", tuple(names)),
        "class names use characters no installed font has; pictures show class numbers "
        f"(install a font that has them, e.g. fonts-noto-cjk), key: {key}",
    )
    return ["DejaVu Sans"], [str(i) for i in range(len(names))]


def _shorten(text, width):
    """`text` cut to `width` terminal columns (wide characters count two), with … where it was cut."""
    if display_width(text) <= width:
        return text
    while display_width(text) > width - 1:
        text = text[:-1]
    return text + "…"


# ---------------------------------------------------------------------------------------------- results


def draw_results(output_dir, history):
    """results.png: loss, accuracy, validation macro-F1 and learning rate per epoch.

    `history` is the metrics.csv rows (numbers or their text); drawn after every epoch with the whole history.
    """
    return _save_picture(Path(output_dir) / "results.png", lambda labels: _results_figure(history))


def _results_figure(history):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def column(key):
        return [float(row[key]) if row.get(key) not in (None, "") else float("nan") for row in history]

    epochs = column("epoch")
    marker = "o" if len(epochs) <= 40 else None  # a single epoch still shows; many epochs are a line
    figure = Figure(figsize=(10, 6.5))
    # Fixed margins rather than constrained layout, which doubles the time of a picture drawn every epoch.
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.9, wspace=0.18, hspace=0.25)
    panels = [
        ("loss", [("train", "train_loss", "C0"), ("val", "val_loss", "C1")]),
        ("accuracy", [("train", "train_acc", "C0"), ("val", "val_acc", "C1")]),
        ("val macro-F1 (mean F1 over classes)", [("val", "val_macro_f1", "C1")]),
        ("learning rate (at the end of each epoch)", [(None, "lr", "C7")]),
    ]
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (title, lines) in zip(axes, panels):
        for label, key, colour in lines:
            ax.plot(epochs, column(key), marker=marker, markersize=4, color=colour, label=label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(lines) > 1:
            ax.legend()
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    # A step schedule spans decades: a log scale shows each step; otherwise plain numbers in 1e-4 style.
    lr = [v for v in column("lr") if v > 0]
    if lr and max(lr) / min(lr) > 20:
        axes[3].set_yscale("log")
    else:
        axes[3].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    figure.suptitle(f"training curves, {len(epochs)} epochs")
    return figure


# ------------------------------------------------------------------------------------- confusion matrix


def draw_confusion_matrix(output_dir, confusion, class_names, prefix=""):
    """{prefix}confusion_matrix.png: counts and row-normalised shares side by side (rows: true class).

    Up to 30 classes every cell shows its number and every class its name; beyond that the cells are colour
    only and the names are thinned to about 40 per axis.
    """
    what = prefix.rstrip("_") or "validation"
    path = Path(output_dir) / f"{prefix}confusion_matrix.png"
    return _save_picture(path, lambda labels: _confusion_figure(confusion, labels, what), class_names)


def _confusion_figure(confusion, labels, what):
    import numpy as np
    from matplotlib.figure import Figure

    counts = torch.as_tensor(confusion).detach().cpu().long().numpy()
    n = len(counts)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    step = -(-n // 40)  # ticks: every class up to 40, then every step-th
    ticks = list(range(0, n, step))
    tick_labels = [_shorten(labels[i], 20) for i in ticks]
    tick_size = 9 if n <= 10 else 8 if n <= 30 else 6
    longest = max((display_width(label) for label in tick_labels), default=1)
    rotate = longest > 2
    label_room = 0.2 + (0.65 if rotate else 0.12) * longest * tick_size / 72  # inches the names take
    side = min(12.0, max(3.5, 0.3 * n + 1.0))  # inches per matrix: ~0.3 in per cell up to 36 classes
    figure = Figure(figsize=(2 * (side + label_room) + 2.2, side + label_room + 1.0), layout="compressed")
    panels = [
        (counts, "counts", max(int(counts.max(initial=0)), 1), lambda v: f"{v:d}"),
        (shares, "share of each true class (rows sum to 1)", 1.0, lambda v: f"{v:.2f}"),
    ]
    for ax, (values, title, top, text) in zip(figure.subplots(1, 2), panels):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top)
        figure.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(ticks, tick_labels, fontsize=tick_size, rotation=45 if rotate else 0)
        if rotate:
            for tick in ax.get_xticklabels():
                tick.set(ha="right", rotation_mode="anchor")
        ax.set_yticks(ticks, tick_labels, fontsize=tick_size)
        if n <= 30:
            cell_size = 9 if n <= 10 else 7 if n <= 20 else 5.5
            for i, j in zip(*np.nonzero(counts)):  # zero cells stay blank, so the mistakes stand out
                colour = "white" if values[i, j] > top / 2 else "black"
                # Out of the layout: the numbers sit inside the axes, and measuring all 1,800 of a 30-class
                # picture for the layout took seconds.
                cell = ax.text(j, i, text(values[i, j]), ha="center", va="center", fontsize=cell_size, color=colour)
                cell.set_in_layout(False)
    total, right = int(counts.sum()), int(np.trace(counts))
    figure.suptitle(f"{what}: {right} of {total} images right ({right / max(total, 1):.1%}), {n} classes")
    return figure


# ------------------------------------------------------------------------------------------ image grids


def prediction_order(true, predicted, confidence):
    """Indices of the images, in the order worth looking at: mistakes first, the most confident mistakes
    first, then the right answers, the least confident first (the highest losses first, as fastai's
    plot_top_losses)."""
    true, predicted, confidence = (torch.as_tensor(x).flatten().tolist() for x in (true, predicted, confidence))
    return sorted(
        range(len(true)),
        key=lambda i: (true[i] == predicted[i], confidence[i] if true[i] == predicted[i] else -confidence[i]),
    )


# What evaluate() keeps for val_predictions.jpg before the first batch: (uint8 images, true, predicted, confidence).
NO_EXAMPLES = (torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def keep_examples(kept, batch, keep):
    """The `keep` images of `kept` and a new `batch` that prediction_order puts first: a running selection, so
    memory stays at `keep` images whatever the size of the data."""
    joined = [torch.cat([a, b]) if len(a) else b for a, b in zip(kept, batch)]
    chosen = prediction_order(*joined[1:])[:keep]
    return [part[chosen] for part in joined]


def draw_predictions(output_dir, images, true, predicted, confidence, class_names, max_images=32):
    """val_predictions.jpg: images as the model saw them (uint8 N×3×H×W, before normalisation) with their true
    label, predicted label and confidence, in `prediction_order`; a green frame and ✓ when right, red and ✗
    when wrong. Pass all the images, or only those `prediction_order` puts first."""

    def draw(labels):
        order = prediction_order(true, predicted, confidence)[:max_images]
        captions, colours = [], []
        for i in order:
            t, p, c = int(true[i]), int(predicted[i]), float(confidence[i])
            mark, colour = ("✓", RIGHT_COLOUR) if t == p else ("✗", WRONG_COLOUR)
            captions.append(f"true {_shorten(labels[t], 16)}\n{mark} pred {_shorten(labels[p], 12)} {c:.0%}")
            colours.append(colour)
        return _grid_figure([images[i] for i in order], captions, colours)

    return _save_picture(Path(output_dir) / "val_predictions.jpg", draw, class_names)


def draw_batch(output_dir, images, labels, class_names, max_images=32):
    """train_batch.jpg: the first images of a training batch after augmentation (uint8 N×3×H×W), with labels."""

    def draw(names):
        count = min(len(images), max_images)
        captions = [_shorten(names[int(labels[i])], 22) for i in range(count)]
        return _grid_figure([images[i] for i in range(count)], captions, [None] * count)

    return _save_picture(Path(output_dir) / "train_batch.jpg", draw, class_names)


def _grid_figure(images, captions, colours):
    """The images in rows of GRID_COLUMNS, each scaled to GRID_CELL pixels with its caption above and an
    optional coloured frame. The mosaic is built pixel for pixel and shown at 1:1, which is much faster than
    one matplotlib axes per image; matplotlib only writes the captions."""
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    if not len(images):
        raise ValueError("no images to show")
    lines = max((caption.count("\n") + 1 for caption in captions), default=1)
    caption_height, frame, gap = 4 + 12 * lines, 3, 6
    cell_width, cell_height = GRID_CELL + 2 * frame, caption_height + GRID_CELL + 2 * frame
    columns = max(1, min(GRID_COLUMNS, len(images)))
    rows = max(1, -(-len(images) // columns))
    width, height = columns * (cell_width + gap) + gap, rows * (cell_height + gap) + gap
    canvas = np.full((height, width, 3), 255, np.uint8)
    spots = []
    for k, (image, colour) in enumerate(zip(images, colours)):
        x = gap + (k % columns) * (cell_width + gap)
        y = gap + (k // columns) * (cell_height + gap)
        top = y + caption_height
        if colour is not None:  # the frame: the image is drawn over the middle of this square
            canvas[top : top + cell_height - caption_height, x : x + cell_width] = colour
        picture = _to_pil(image)
        scale = GRID_CELL / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        # tiny images are enlarged with visible pixels, as the model saw them; large ones are shrunk smoothly
        picture = picture.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)
        left, upper = x + frame + (GRID_CELL - size[0]) // 2, top + frame + (GRID_CELL - size[1]) // 2
        canvas[upper : upper + size[1], left : left + size[0]] = np.asarray(picture)
        spots.append((x, top))
    figure = Figure(figsize=(width / PICTURE_DPI, height / PICTURE_DPI))
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for (x, top), caption, colour in zip(spots, captions, colours):
        colour = "black" if colour is None else [c / 255 for c in colour]
        ax.text(x + 1, top - 3, caption, ha="left", va="bottom", fontsize=7, color=colour, linespacing=1.15)
    return figure


def _to_pil(image):
    """A C×H×W image tensor (uint8, or float in [0, 1]; 1 or 3 channels) as an RGB PIL image."""
    from PIL import Image

    image = torch.as_tensor(image).detach().cpu()
    if image.is_floating_point():
        image = image.clamp(0, 1).mul(255).round()
    image = image.to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return Image.fromarray(image[:3].permute(1, 2, 0).contiguous().numpy())


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
