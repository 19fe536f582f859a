"""Every picture a run or predict.py draws: results.png (curves), confusion_matrix.png, roc.png,
calibration.png, pr_curves.png (multi-label), val_predictions.jpg and train_batch.jpg, and the fonts their
class names need.

Plots render, the caller saves or embeds: every draw_* function returns a Picture (its file name and its
encoded bytes; report.save_picture writes it into the run folder). A picture is never worth a run: a failure
(matplotlib missing, an odd value) is one warning line and None. matplotlib is imported only when drawing, so
importing this module stays fast and works without it. Figures are plain matplotlib Figure objects on the Agg
canvas, never pyplot: no display is needed, no global backend is switched in the caller's process, and nothing
stays registered in memory after a picture is rendered.
"""

import sys
from pathlib import Path
from typing import NamedTuple

import torch

from errors import one_line
from metrics import display_width

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


class Picture(NamedTuple):
    """A rendered picture: the file name it is saved as in a run folder (its extension says the format), and
    its encoded bytes, to save (report.save_picture) or embed."""

    name: str
    data: bytes


def _render(name, draw, class_names=()):
    """The Figure that draw(labels) returns, encoded as `name`'s format (.png or .jpg): a Picture.

    `labels` are the class names as text, or the class numbers when no installed font has their characters.
    Any failure becomes one warning line and None: a picture must never stop training.
    """
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
            suffix = Path(name).suffix
            options = {"pil_kwargs": {"quality": 85}} if suffix == ".jpg" else {}
            figure.savefig(buffer, format=suffix[1:], dpi=PICTURE_DPI, **options)
        return Picture(name, buffer.getvalue())
    except Exception as e:
        reason = f"{type(e).__name__}: {one_line(e)}"
        _warn_once((name, reason), f"could not draw {name} ({reason})")
        return None


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


def draw_results(history):
    """results.png: loss, accuracy, validation macro-F1 and learning rate per epoch.

    `history` is the metrics.csv rows (numbers or their text); drawn after every epoch with the whole history.
    """
    return _render("results.png", lambda labels: _results_figure(history))


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
        ("val macro-F1 and macro AUC (means over classes)", [("F1", "val_macro_f1", "C1"), ("AUC", "val_auc", "C2")]),
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


def draw_confusion_matrix(confusion, class_names, prefix=""):
    """{prefix}confusion_matrix.png: counts and row-normalised shares side by side (rows: true class).

    Up to 30 classes every cell shows its number and every class its name; beyond that the cells are colour
    only and the names are thinned to about 40 per axis.
    """
    what = prefix.rstrip("_") or "validation"
    return _render(
        f"{prefix}confusion_matrix.png", lambda labels: _confusion_figure(confusion, labels, what), class_names
    )


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


# ------------------------------------------------------------------------------------ ROC, calibration

ROC_MAX_CLASSES = 20  # curves drawn; beyond that a legend of 20 lines is unreadable and the rest are listed


def draw_roc(curves, aucs, class_names, prefix=""):
    """{prefix}roc.png: each class's one-vs-rest ROC curve with its AUC in the legend (metrics.roc_curves);
    a class without positive or negative images has no curve and is named below the plot."""
    what = prefix.rstrip("_") or "validation"
    return _render(f"{prefix}roc.png", lambda labels: _roc_figure(curves, aucs, labels, what), class_names)


def _roc_figure(curves, aucs, labels, what):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 6), layout="constrained")
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance (AUC 0.5)")
    drawable = [c for c, curve in enumerate(curves) if curve is not None]
    for c in drawable[:ROC_MAX_CLASSES]:
        fpr, tpr = curves[c]
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{_shorten(labels[c], 24)} (AUC {aucs[c]:.3f})")
    left_out = [labels[c] for c in drawable[ROC_MAX_CLASSES:]]
    undefined = [labels[c] for c, curve in enumerate(curves) if curve is None]
    notes = []
    if left_out:
        notes.append(f"not drawn ({len(left_out)}): " + ", ".join(_shorten(n, 16) for n in left_out[:30]))
    if undefined:
        notes.append("no AUC (no positive or no negative image): " + ", ".join(_shorten(n, 16) for n in undefined))
    if notes:
        figure.text(0.01, 0.005, "\n".join(notes), fontsize=7, ha="left", va="bottom", wrap=True)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=f"{what}: one-vs-rest ROC per class")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7 if len(drawable) > 8 else 9)
    return figure


def draw_pr_curves(curves, aps, class_names, prefix=""):
    """{prefix}pr_curves.png (multi-label): each class's precision-recall curve with its average precision in
    the legend (metrics.pr_curves); a class without positive images has none and is named below the plot."""
    what = prefix.rstrip("_") or "validation"
    return _render(f"{prefix}pr_curves.png", lambda labels: _pr_figure(curves, aps, labels, what), class_names)


def _pr_figure(curves, aps, labels, what):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 6), layout="constrained")
    ax = figure.subplots()
    drawable = [c for c, curve in enumerate(curves) if curve is not None]
    for c in drawable[:ROC_MAX_CLASSES]:
        recall, precision = curves[c]
        ax.step(recall, precision, where="post", linewidth=1.5, label=f"{_shorten(labels[c], 24)} (AP {aps[c]:.3f})")
    notes = []
    if drawable[ROC_MAX_CLASSES:]:
        notes.append("not drawn: " + ", ".join(_shorten(labels[c], 16) for c in drawable[ROC_MAX_CLASSES:][:30]))
    undefined = [labels[c] for c, curve in enumerate(curves) if curve is None]
    if undefined:
        notes.append("no curve (no positive image): " + ", ".join(_shorten(n, 16) for n in undefined))
    if notes:
        figure.text(0.01, 0.005, "\n".join(notes), fontsize=7, ha="left", va="bottom", wrap=True)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
           title=f"{what}: precision-recall per class")  # fmt: skip
    ax.grid(alpha=0.3)
    if drawable:
        ax.legend(loc="lower left", fontsize=7 if len(drawable) > 8 else 9)
    return figure


def draw_calibration(bins, ece, prefix=""):
    """{prefix}calibration.png: the reliability diagram, accuracy against mean confidence per confidence bin
    (metrics.calibration_bins), with each bin's image count, and the expected calibration error."""
    what = prefix.rstrip("_") or "validation"
    return _render(f"{prefix}calibration.png", lambda labels: _calibration_figure(bins, ece, what))


def _calibration_figure(bins, ece, what):
    from matplotlib.figure import Figure

    edges, counts = bins["edges"], bins["count"]
    lefts, width = edges[:-1], edges[1] - edges[0]
    figure = Figure(figsize=(6.5, 6.5), layout="constrained")
    ax, count_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    shown = [i for i, n in enumerate(counts) if n > 0]
    ax.bar([lefts[i] for i in shown], [bins["accuracy"][i] for i in shown], width=width, align="edge",
           color="C0", edgecolor="white", label="accuracy in the bin")  # fmt: skip
    ax.plot([lefts[i] + width / 2 for i in shown], [bins["confidence"][i] for i in shown], "o", color="C1",
            markersize=4, label="mean confidence in the bin")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy", title=f"{what}: reliability diagram, ECE {ece:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    count_ax.bar(lefts, counts, width=width, align="edge", color="C7", edgecolor="white")
    for i in shown:
        count_ax.text(lefts[i] + width / 2, counts[i], str(counts[i]), ha="center", va="bottom", fontsize=7)
    count_ax.set(xlabel="confidence (probability of the predicted class)", ylabel="images")
    count_ax.set_ylim(0, max(counts, default=1) * 1.25 + 1)
    return figure


def draw_lr_find(lrs, losses, smoothed, suggestion):
    """lr_find.png: the loss against the lr (log scale), raw faint and smoothed, the suggested lr marked."""

    def draw(labels):
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter

        figure = Figure(figsize=(7, 4.5))
        ax = figure.subplots()
        ax.plot(lrs, losses, color="C0", alpha=0.3, linewidth=1, label="loss")
        ax.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed loss")
        import numpy as np

        at = int(np.argmin(np.abs(np.log(lrs) - np.log(suggestion))))  # the curve's point nearest the suggestion
        ax.plot([suggestion], [smoothed[at]], "o", color="C3", markersize=8, label=f"suggested --lr {suggestion:.0e}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0e}"))  # text: math text is off
        ax.xaxis.set_minor_formatter(NullFormatter())
        start = smoothed[: max(1, len(smoothed) // 10)]
        ax.set_ylim(0.9 * min(min(losses), min(smoothed)), 1.5 * max(start))  # not the divergence at the end
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title(f"learning-rate range test, {len(lrs)} steps")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        figure.tight_layout()
        return figure

    return _render("lr_find.png", draw)


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


def worth_seeing(predictions, data, count=32):
    """(uint8 images, true, predicted, confidence) of the `count` evaluated images `prediction_order` puts
    first (metrics.Predictions), the images read again from the MyDataset `data` as the model saw them."""
    chosen = prediction_order(predictions.labels, predictions.predicted, predictions.confidence)[:count]
    images = [data[i][0] for i in predictions.indices[chosen].tolist()]
    return (images, *(x[chosen] for x in (predictions.labels, predictions.predicted, predictions.confidence)))


def draw_predictions(images, true, predicted, confidence, class_names, max_images=32, name=None):
    """val_predictions.jpg (or `name`): images as the model saw them (uint8 N×3×H×W, before normalisation) with
    their true label, predicted label and confidence, in `prediction_order`; a green frame and ✓ when right,
    red and ✗ when wrong. Pass all the images, or only those `prediction_order` puts first."""

    def draw(labels):
        order = prediction_order(true, predicted, confidence)[:max_images]
        captions, colours = [], []
        for i in order:
            t, p, c = int(true[i]), int(predicted[i]), float(confidence[i])
            mark, colour = ("✓", RIGHT_COLOUR) if t == p else ("✗", WRONG_COLOUR)
            captions.append(f"true {_shorten(labels[t], 16)}\n{mark} pred {_shorten(labels[p], 12)} {c:.0%}")
            colours.append(colour)
        return _grid_figure([images[i] for i in order], captions, colours)

    return _render(name or "val_predictions.jpg", draw, class_names)


def label_sets_worth_seeing(predictions, thresholds, data, count=32):
    """(uint8 images, true sets, predicted sets, mistakes) of multi-label predictions (metrics.Predictions,
    per-class thresholds): the images with a wrong label set first, those furthest off first, then the right
    ones; sets are lists of class indices, mistakes the count of wrong labels."""
    import metrics

    predicted = metrics.predicted_sets(predictions, thresholds)
    true = predictions.labels > 0.5
    wrong = ((predicted != true) & ~predictions.labels.isnan()).sum(1)
    chosen = sorted(range(len(predictions)), key=lambda i: -int(wrong[i]))[:count]
    images = [data[i][0] for i in predictions.indices[chosen].tolist()]
    as_sets = [(true[i].nonzero().flatten().tolist(), predicted[i].nonzero().flatten().tolist()) for i in chosen]
    return images, [t for t, _ in as_sets], [p for _, p in as_sets], [int(wrong[i]) for i in chosen]


def draw_label_sets(images, true, predicted, mistakes, class_names, name="val_predictions.jpg"):
    """val_predictions.jpg for a multi-label model: each image with its true and predicted label sets; a red
    frame and ✗ when the sets differ in any label, green and ✓ when they are the same."""

    def draw(labels):
        def names(indices):
            return _shorten(", ".join(labels[i] for i in indices) or "(none)", 20)

        captions, colours = [], []
        for t, p, wrong in zip(true, predicted, mistakes):
            mark, colour = ("✗", WRONG_COLOUR) if wrong else ("✓", RIGHT_COLOUR)
            captions.append(f"true {names(t)}\n{mark} pred {names(p)}")
            colours.append(colour)
        return _grid_figure(images, captions, colours)

    return _render(name, draw, class_names)


def draw_batch(images, labels, class_names, max_images=32):
    """train_batch.jpg: the first images of a training batch after augmentation (uint8 N×3×H×W), with labels
    (class indices, or multi-hot rows)."""

    def draw(names):
        count = min(len(images), max_images)
        if labels.ndim == 2:  # multi-label
            sets = [", ".join(names[c] for c in row.nan_to_num().nonzero().flatten().tolist()) for row in labels]
            captions = [_shorten(sets[i] or "(none)", 22) for i in range(count)]
        else:
            captions = [_shorten(names[int(labels[i])], 22) for i in range(count)]
        return _grid_figure([images[i] for i in range(count)], captions, [None] * count)

    return _render("train_batch.jpg", draw, class_names)


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


# Every picture-drawing function of this module: tests that check other behaviours replace them all (drawing
# costs about a second per run, more than a tiny test epoch).
DRAWINGS = tuple(name for name in dir() if name.startswith("draw_"))
