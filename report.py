"""What a run reports, built once and written in one place: per epoch metrics.csv; at the end, for the best
model on validation and test (or an --evaluate folder), the printed tables, report.csv, confusion_matrix.csv,
the per-image predictions and the pictures; after --folds, the cross-validation summary. The numbers come from
metrics.py, the pictures from plots.py.

Validation figures are optimistic: the best epoch (and a multi-label run's thresholds) were chosen on those
images. The test split, or external data through --evaluate, gives the honest figure.
"""

import csv
import statistics
import sys
from pathlib import Path

import numpy as np

import decision
import metrics
import plots
from files import WriteError, write_atomically, write_csv_atomically
from labels import LABEL_SEP, label_matrix

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "val_macro_f1", "val_auc"]


LABEL_METRIC_COLUMNS = [*METRIC_COLUMNS, "val_map"]  # multi-label: val_acc is exact-match accuracy


def write_metrics(output_dir, history):
    columns = LABEL_METRIC_COLUMNS if history and "val_map" in history[0] else METRIC_COLUMNS
    write_csv_atomically(output_dir / "metrics.csv", columns, history)


def write_report(output_dir, predictions, data, title, prefix="", thresholds=None, *, temperature=None, point=None,
                 point_chosen_here=False, subgroups=None):  # fmt: skip
    """The final report of a model on one part of the data (metrics.Predictions of the MyDataset `data`):
    printed, and saved as {prefix}report.csv, {prefix}confusion_matrix.csv, {val_|test_}predictions.csv and
    the pictures {prefix}confusion_matrix.png, {prefix}roc.png, {prefix}calibration.png, and for validation
    (no prefix) val_predictions.jpg. With the model's `temperature` the probabilities are calibrated first
    (report.csv adds the temperature, and NLL and ECE before it); with its operating `point` (decision.py)
    each class's row adds its threshold and the op_* figures at it (`point_chosen_here`: chosen on these
    images, so optimistic); `subgroups` ({column: value per image}) writes {prefix}subgroups.csv.
    Multi-label: see write_label_report."""
    if predictions.multi_label:
        return write_label_report(output_dir, predictions, data, title, prefix, thresholds)
    class_names = data.class_names
    uncalibrated, predictions = predictions, decision.with_temperature(predictions, temperature)
    rows, confusion = metrics.report(predictions, class_names)
    lines = [metrics.report_text(title, metrics.mean_loss(predictions), rows, confusion, class_names)]
    if point is not None:
        for row, columns in zip(rows, decision.operating_columns(predictions, point)):
            row.update(columns)
        lines += decision.operating_text(rows, point, class_names, point_chosen_here)
    if temperature is not None:
        calibration = decision.calibration_rows(uncalibrated, temperature)
        rows += calibration
        nll, nll_before, ece_before = (row["value"] for row in calibration[1:])
        ece = next(row["value"] for row in rows if row["label"] == "ece")
        lines.append(
            f"temperature {temperature:.3f}: NLL {nll_before:.3f} -> {nll:.3f}, ECE {ece_before:.3f} -> {ece:.3f}"
        )
    print("\n".join(lines), flush=True)
    write_csv_atomically(output_dir / f"{prefix}report.csv", metrics.REPORT_COLUMNS, rows)
    header = ["true\\predicted", *class_names]
    matrix_rows = [dict(zip(header, [name, *counts])) for name, counts in zip(class_names, confusion.tolist())]
    write_csv_atomically(output_dir / f"{prefix}confusion_matrix.csv", header, matrix_rows)
    write_predictions(output_dir / f"{prefix or 'val_'}predictions.csv", predictions, data, point)
    if subgroups:
        subgroup_rows = decision.subgroup_rows(predictions, subgroups, class_names, point)
        decision.warn_small_subgroups(subgroup_rows)
        write_csv_atomically(output_dir / f"{prefix}subgroups.csv", decision.SUBGROUP_COLUMNS, subgroup_rows)

    save_picture(output_dir, plots.draw_confusion_matrix(confusion, class_names, prefix))
    aucs = [row["auc"] for row in rows[: len(class_names)]]
    save_picture(output_dir, plots.draw_roc(metrics.roc_curves(predictions), aucs, class_names, prefix))
    ece = next(row["value"] for row in rows if row["label"] == "ece")
    save_picture(output_dir, plots.draw_calibration(metrics.calibration_bins(predictions), ece, prefix))
    if not prefix:
        save_picture(output_dir, plots.draw_predictions(*plots.worth_seeing(predictions, data), class_names))


def write_predictions(path, predictions, data, point=None):
    """One row per evaluated image: image, label, predicted, confidence, then p_<class> for every class, and with
    an operating point `decision`: a binary model's class at its threshold, else the classes at or above theirs
    (joined by ';')."""
    class_names = data.class_names
    header = ["image", "label", "predicted", "confidence", *(f"p_{name}" for name in class_names)]
    probabilities = predictions.probabilities.tolist()
    rows = [
        dict(zip(header, [data.images[i], class_names[t], class_names[p], max(probs), *probs]))
        for i, t, p, probs in zip(
            predictions.indices.tolist(), predictions.labels.tolist(), predictions.predicted.tolist(), probabilities
        )
    ]
    if point is not None:
        header.append("decision")
        for row, decided in zip(rows, decision.decision_names(predictions.probabilities, point, class_names)):
            row["decision"] = decided
    write_csv_atomically(path, header, rows)


def write_label_report(output_dir, predictions, data, title, prefix, thresholds):
    """write_report for a multi-label model at its per-class `thresholds`: {prefix}report.csv
    (LABEL_REPORT_COLUMNS), {val_|test_}predictions.csv, {prefix}pr_curves.png and {prefix}roc.png, and
    for validation val_predictions.jpg (true and predicted label sets)."""
    class_names = data.class_names
    rows = metrics.label_report(predictions, class_names, thresholds)
    print(metrics.label_report_text(title, metrics.mean_loss(predictions), rows, class_names), flush=True)
    write_csv_atomically(output_dir / f"{prefix}report.csv", metrics.LABEL_REPORT_COLUMNS, rows)
    write_label_predictions(output_dir / f"{prefix or 'val_'}predictions.csv", predictions, data, thresholds)
    per_class = rows[: len(class_names)]
    aps, aucs = [row["ap"] for row in per_class], [row["auc"] for row in per_class]
    save_picture(output_dir, plots.draw_pr_curves(metrics.pr_curves(predictions), aps, class_names, prefix))
    save_picture(output_dir, plots.draw_roc(metrics.roc_curves(predictions), aucs, class_names, prefix))
    if not prefix:
        seen = plots.label_sets_worth_seeing(predictions, thresholds, data)
        save_picture(output_dir, plots.draw_label_sets(*seen, class_names))


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
        true_names = LABEL_SEP.join(name for name, t in zip(class_names, true) if t == 1)
        predicted_names = LABEL_SEP.join(name for name, p in zip(class_names, predicted) if p)
        rows.append(dict(zip(header, [data.images[i], true_names, predicted_names, *probabilities])))
    write_csv_atomically(path, header, rows)


CV_SCORES = ("accuracy", "macro f1", "macro auc", "map", "exact match")  # those a report has
THRESHOLD_SCORES = ("macro f1", "exact match")  # multi-label: at the thresholds chosen on validation


def write_cv_summary(output_dir, folds):
    """After --folds K: cv_summary.csv (each fold's validation scores, and test scores when there is a test
    set, with their mean and sample standard deviation), cv_predictions.csv (every image's out-of-fold
    prediction, with its fold), and the same summary on the console."""

    def read(path):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    fold_dirs = [Path(output_dir) / f"fold{k}" for k in range(1, folds + 1)]
    rows, lines = [], []
    for part, prefix in (("val", ""), ("test", "test_")):
        if not all((d / f"{prefix}report.csv").exists() for d in fold_dirs):
            continue
        reports = [{row["label"]: row["value"] for row in read(d / f"{prefix}report.csv")} for d in fold_dirs]
        multi_label = "map" in reports[0]
        for score in (score for score in CV_SCORES if score in reports[0]):
            values = [float(report[score]) if report.get(score) else float("nan") for report in reports]
            defined = [v for v in values if v == v]
            mean = statistics.fmean(defined) if defined else float("nan")
            sd = statistics.stdev(defined) if len(defined) > 1 else float("nan")
            # A multi-label fold's thresholds are chosen on its own validation images: its F1 and exact match
            # there are optimistic (+0.05 to +0.11 macro-F1 against fresh data, measured at 200 and 60 images).
            tuned = part == "val" and multi_label and score in THRESHOLD_SCORES
            note = "optimistic: thresholds tuned on these images" if tuned else ""
            rows.append({"metric": f"{part} {score}", **{f"fold{k}": v for k, v in enumerate(values, 1)},
                         "mean": mean, "sd": sd, "folds": f"{len(defined)} of {folds}", "note": note})  # fmt: skip
            counted = f" ({len(defined)} of {folds} folds; undefined in the others)" if len(defined) < folds else ""
            lines.append(f"{part} {score} {mean:.3f} ± {sd:.3f}{counted}{' (optimistic)' * tuned}")
    header = ["metric", *(f"fold{k}" for k in range(1, folds + 1)), "mean", "sd", "folds", "note"]
    write_csv_atomically(Path(output_dir) / "cv_summary.csv", header, rows)
    predictions = [dict(row, fold=k) for k, d in enumerate(fold_dirs, 1) for row in read(d / "val_predictions.csv")]
    columns = ["fold", *(key for key in predictions[0] if key != "fold")]
    write_csv_atomically(Path(output_dir) / "cv_predictions.csv", columns, predictions)
    print(f"\ncross-validation, {folds} folds (mean ± sd over folds): " + ", ".join(lines))
    print(f"{output_dir / 'cv_summary.csv'}, {output_dir / 'cv_predictions.csv'}: {len(predictions)} images, each once")


def print_setup(args, ctx, parts, split_method, train_loader, output_dir):
    train_set, val_set, test_set = parts["train"], parts["val"], parts["test"]
    class_names = train_loader.dataset.class_names
    workers, cached = train_loader.num_workers, train_loader.dataset.cache is not None
    precision = "fp32" if ctx.amp_dtype is None else str(ctx.amp_dtype).removeprefix("torch.") + " autocast"
    processes = f", {ctx.world_size} processes" if ctx.world_size > 1 else ""
    print(
        f"device {ctx.device}{processes}, {precision}{', channels_last' if ctx.channels_last else ''}, "
        f"loader workers {workers}{', RAM cache' if cached else ''}"
    )
    counts = train_set.samples["label"].value_counts()
    if train_set.multi_label:  # images with each label
        counts = dict(zip(class_names, np.nansum(label_matrix(train_set.samples, class_names), 0).astype(int)))
    test = f" / {len(test_set.samples)} test" if test_set is not None else ""
    print(
        f"{len(train_set.samples)} train / {len(val_set.samples)} val{test} images ({split_method} split), "
        f"{len(class_names)} {'labels' if train_set.multi_label else 'classes'}: "
        + ", ".join(f"{c} {counts.get(c, 0)}" for c in class_names)
    )
    global_batch = args.batch_size * args.accum_steps * ctx.world_size
    batch = f"batch {args.batch_size}" + f" x {args.accum_steps} accumulated" * (args.accum_steps > 1)
    batch += f" x {ctx.world_size} processes" * (ctx.world_size > 1)
    batch += f" (global {global_batch})" * (global_batch > args.batch_size)
    weights, epochs = f" from {args.weights}" * bool(args.weights), f"{args.epochs} epoch" + "s" * (args.epochs != 1)
    print(f"{args.model}{weights}, {args.optimizer} lr {args.lr:g}, {batch}, {epochs} -> {output_dir}")
    if train_loader.drop_last:  # decided once, by build_dataloaders
        print("note: each epoch's last training batch, a single image, is dropped (BatchNorm cannot train on it)")


def print_epoch(row, epochs, improved, skipped):
    map_ = f" map {row['val_map']:.3f}" if "val_map" in row else ""  # multi-label; acc is exact-match
    print(
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}  "
        f"val_loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}{map_}{' *best' if improved else ''}  "
        f"{row['seconds']:.1f}s{f'  skipped {skipped} bad images' if skipped else ''}",
        flush=True,
    )


def save_picture(output_dir, picture):
    """Write a rendered plots.Picture into the run folder under its own name, atomically; a picture that could
    not be drawn (None, already warned about) writes nothing. Returns whether a file was written."""
    if picture is None:
        return False
    try:
        write_atomically(Path(output_dir) / picture.name, lambda f: f.write(picture.data))
    except WriteError as e:  # a full disk: the run goes on, its checkpoints then stop it if they cannot be saved
        print(f"warning: could not draw {picture.name} ({e})", file=sys.stderr)
        return False
    return True
