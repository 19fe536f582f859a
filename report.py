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
from errors import one_line
from files import WriteError, write_atomically, write_csv_atomically
from labels import LABEL_SEP, label_matrix

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "val_macro_f1", "val_auc"]


LABEL_METRIC_COLUMNS = [*METRIC_COLUMNS, "val_map"]  # multi-label: val_acc is exact-match accuracy


def epoch_done(output_dir, history):
    """After each epoch: metrics.csv, results.png and the refreshed report.html."""
    write_metrics(output_dir, history)
    save_picture(output_dir, plots.draw_results(history))
    write_page(output_dir, state=f"after epoch {history[-1]['epoch']}")


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
    ece = next(row["value"] for row in rows if row["label"] == "ece")
    lines = [metrics.report_text(title, metrics.mean_loss(predictions), rows, confusion, class_names)]
    if point is not None:
        for row, columns in zip(rows, decision.operating_columns(predictions, point)):
            row.update(columns)
        lines += decision.operating_text(rows, point, class_names, point_chosen_here)
    if temperature is not None:
        calibration = decision.calibration_rows(uncalibrated, temperature)
        rows += calibration
        nll, nll_before, ece_before = (row["value"] for row in calibration[1:])
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

    fold_dirs = [Path(output_dir) / f"fold{k}" for k in range(1, folds + 1)]
    rows, lines = [], []
    for part, prefix in (("val", ""), ("test", "test_")):
        if not all((d / f"{prefix}report.csv").exists() for d in fold_dirs):
            continue
        reports = [{row["label"]: row["value"] for row in _read_csv(d / f"{prefix}report.csv")} for d in fold_dirs]
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
    predictions = [
        dict(row, fold=k) for k, d in enumerate(fold_dirs, 1) for row in _read_csv(d / "val_predictions.csv")
    ]
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


# ------------------------------------------------------------------------------------ the page, the methods

TEMPLATES = Path(__file__).resolve().parent / "templates"
FILE_DESCRIPTIONS = {
    "report.html": "this page",
    "methods.md": "the methods paragraph and results sentence for a paper, every number from this run",
    "args.json": "every flag as the run used it, and what was chosen for the machine",
    "split.csv": "every image with its label and part (train, val, test) and its group",
    "metrics.csv": "per epoch: losses, accuracy, macro-F1, AUC, learning rate, seconds",
    "best.pt": "the best epoch's weights, its temperature and frozen operating point (predict.py, export.py)",
    "last.pt": "the last epoch with the optimizer state: --resume continues from it",
    "report.csv": "validation report: per class scores and summary scores with 95% intervals (optimistic)",
    "test_report.csv": "test report at the frozen operating point: the honest figures",
    "confusion_matrix.csv": "validation confusion matrix (rows true, columns predicted)",
    "test_confusion_matrix.csv": "test confusion matrix",
    "val_predictions.csv": "every evaluated image's probabilities, prediction and decision",
    "test_predictions.csv": "every test image's probabilities, prediction and decision",
    "subgroups.csv": "validation figures per --subgroup-col value",
    "test_subgroups.csv": "test figures per --subgroup-col value",
    "duplicates.csv": "copies of an image across parts (exact or near)",
    "cv_summary.csv": "each fold's scores with their mean and standard deviation",
    "cv_predictions.csv": "every image's out-of-fold prediction",
    "compare.csv": "two models' paired differences",
}
PICTURE_CAPTIONS = {
    "results.png": "losses, accuracy and learning rate per epoch",
    "confusion_matrix.png": "confusion matrix",
    "roc.png": "one-vs-rest ROC curves",
    "calibration.png": "calibration: confidence against accuracy",
    "pr_curves.png": "precision-recall curves",
    "val_predictions.jpg": "validation images, the worst mistakes first",
    "val_cam.jpg": "Grad-CAM: where the model looked, mistakes first",
    "train_batch.jpg": "a training batch as the model sees it (augmented)",
    "lr_find.png": "learning-rate range test",
}
OPTIMISTIC = ("Validation figures are optimistic: the best epoch and the operating point were chosen on these "
              "images. The test split, or external data through --evaluate, is the honest figure.")  # fmt: skip
SETTINGS_SHOWN = ("model", "weights", "freeze_backbone", "image_size", "epochs", "batch_size", "optimizer", "lr",
                  "weight_decay", "lr_schedule", "warmup_epochs", "label_smoothing", "augment", "crop_scale",
                  "best_metric", "operating_point", "calibrate", "seed", "device", "precision", "torch")  # fmt: skip
PER_CLASS_SCORES = ("precision", "recall", "specificity", "f1", "ap", "auc")
OPERATING_SHOWN = (("sensitivity", "op_sensitivity"), ("specificity", "op_specificity"), ("PPV", "op_ppv"),
                   ("NPV", "op_npv"))  # fmt: skip


def _read_csv(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(text, digits=3):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text or ""
    return f"{value:.{digits}f}" if value == value else ""


def _with_ci(row, name):
    value, low, high = row.get(name, ""), row.get(f"{name}_low", ""), row.get(f"{name}_high", "")
    if value == "":
        return ""
    return f"{_number(value)} ({_number(low)}-{_number(high)})" if low != "" and high != "" else _number(value)


def _summary_value(row):
    """A summary row of report.csv as 'value (low-high)'."""
    return _with_ci({"v": row["value"], "v_low": row.get("ci_low", ""), "v_high": row.get("ci_high", "")}, "v")


def _picture(folder, name, caption=None):
    import base64

    path = Path(folder) / name
    if not path.is_file():
        return None
    kind = "image/png" if name.endswith(".png") else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"name": name, "src": f"data:{kind};base64,{data}", "caption": caption or name, "wide": name.endswith("jpg")}


def _size(path):
    size = Path(path).stat().st_size
    return next(f"{size / 1024**k:.0f} {unit}" for k, unit in ((3, "GB"), (2, "MB"), (1, "kB"), (0, "B"))
                if size >= 1024**k or k == 0)  # fmt: skip


def run_contents(output_dir):
    """Everything report.html and methods.md say, read back from the run folder's own files (so that a run, an
    --evaluate folder and a cross-validation folder all get their page the same way)."""
    import json

    folder = Path(output_dir)
    args = json.loads((folder / "args.json").read_text()) if (folder / "args.json").is_file() else {}
    split, history = _read_csv(folder / "split.csv"), _read_csv(folder / "metrics.csv")
    contents = {"folder": str(folder), "args": args, "split": split, "history": history, "parts": {}}
    for part, prefix in (("validation", ""), ("test", "test_")):
        rows = _read_csv(folder / f"{prefix}report.csv")
        if rows:
            contents["parts"][part] = {"prefix": prefix, "rows": rows,
                                       "subgroups": _read_csv(folder / f"{prefix}subgroups.csv")}  # fmt: skip
    contents["duplicates"] = _read_csv(folder / "duplicates.csv")
    contents["folds"] = _read_csv(folder / "cv_summary.csv")
    return contents


def _data_section(contents):
    split, args = contents["split"], contents["args"]
    if not split:
        return None
    parts = [p for p in ("train", "val", "test") if any(row["split"] == p for row in split)]
    counts = {}
    label_sets = args.get("label_sep") or args.get("label_cols") or any(LABEL_SEP in row["label"] for row in split)
    for row in split:
        for label in row["label"].split(LABEL_SEP) if label_sets else [row["label"]]:
            counts.setdefault(label, dict.fromkeys(parts, 0))[row["split"]] += 1
    rows = [{"label": label, "counts": [counts[label][p] for p in parts]} for label in sorted(counts)]
    sizes = {p: sum(row["split"] == p for row in split) for p in parts}
    rows.append({"label": "all images", "counts": [sizes[p] for p in parts]})
    summary = (
        ", ".join(f"{p} {sizes[p]}" for p in parts) + f" images; split: {args.get('split_method', 'see split.csv')}"
    )
    notes = []
    groups = {p: {row["group"] for row in split if row["split"] == p and row.get("group")} for p in parts}
    if any(groups.values()):
        by = args.get("group_col") or args.get("group_pattern")
        shared = set.union(*(groups[a] & groups[b] for i, a in enumerate(parts) for b in parts[i + 1 :]), set())
        verb, whose = ("is", "its") if len(shared) == 1 else ("are", "their")
        leak = f"{_plural(len(shared), 'group')} {verb} in two parts: {whose} images leak"
        leak = leak if shared else "no group is in two parts"
        notes.append(f"grouped by {by}: " + ", ".join(f"{len(groups[p])} groups in {p}" for p in parts) + f"; {leak}")
    duplicates = contents["duplicates"]
    if duplicates:
        done = "dropped from the later part (--dedupe)" if args.get("dedupe") else "kept (see duplicates.csv)"
        notes.append(f"{len(duplicates)} pairs of copies across parts found: {done}")
    elif not args.get("no_duplicate_check"):
        notes.append("no copies of an image across parts (exact or near) were found")
    if args.get("skip_bad_images"):
        notes.append("--skip-bad-images: images that failed to decode were left out (the console named them)")
    return {"parts": parts, "rows": rows, "summary": summary, "notes": notes}


def _report_section(folder, part, report, evaluation):
    rows, prefix = report["rows"], report["prefix"]
    class_rows = [
        row for row in rows if row.get("value", "") == "" and row["label"] not in ("macro avg", "weighted avg")
    ]
    class_rows += [row for row in rows if row["label"] in ("macro avg", "weighted avg")]
    scores = [name for name in PER_CLASS_SCORES if name in rows[0]]
    section = {
        "id": part,
        "columns": ["class", "support", *scores],
        "heading": "Evaluation" if evaluation else f"{part.capitalize()} report",
        "rows": [[row["label"], row["support"], *(_with_ci(row, name) for name in scores)] for row in class_rows],
        "summary": [
            (row["label"], _summary_value(row), row.get("ci_method", "")) for row in rows if row.get("value", "") != ""
        ],
        "note": OPTIMISTIC if part == "validation" and not evaluation else "",
    }
    operating = [row for row in class_rows if row.get("threshold") and row.get("op_sensitivity") is not None]
    if operating:
        section["operating"] = {
            "columns": ["class", "threshold", *(label for label, _ in OPERATING_SHOWN)],
            "rows": [
                [row["label"], _number(row["threshold"], 4), *(_with_ci(row, name) for _, name in OPERATING_SHOWN)]
                for row in operating
            ],  # fmt: skip
        }
    if report["subgroups"]:
        columns = ["column", "value", "class", "n", "positives", "auc", "sensitivity", "specificity", "warning"]
        section["subgroups"] = {"columns": columns, "rows": [
            [row["column"], row["value"], row["class"], row["n"], row["positives"], _with_ci(row, "auc"),
             _with_ci(row, "sensitivity"), _with_ci(row, "specificity"), row.get("warning", "")]
            for row in report["subgroups"]]}  # fmt: skip
    names = ["confusion_matrix.png", "roc.png", "calibration.png", "pr_curves.png"]
    names += ["val_predictions.jpg", "val_cam.jpg"] if not prefix else []
    pictures = [
        _picture(folder, (prefix if name.endswith("png") else "") + name, PICTURE_CAPTIONS[name]) for name in names
    ]
    section["pictures"] = [p for p in pictures if p]
    return section


def page_context(output_dir, state=None):
    """What report.html shows (see templates/report.html)."""
    import datetime

    folder = Path(output_dir)
    contents = run_contents(folder)
    args = contents["args"]
    evaluation = not args and bool(contents["parts"])
    title = f"Evaluation: {folder.name}" if evaluation else f"Run {folder.name}"
    if contents["folds"]:
        title = f"Cross-validation: {folder.name}"
    context = {
        "title": title, "folder": str(folder), "state": state,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "honest_note": "" if evaluation else OPTIMISTIC,
        "data": _data_section(contents),
        "settings": [(name, args[name]) for name in SETTINGS_SHOWN if name in args],
        "all_settings": sorted(args.items()),
        "pictures": {"training": [p for p in [_picture(folder, "results.png", PICTURE_CAPTIONS["results.png"])] if p],
                     "other": [p for p in (_picture(folder, n, PICTURE_CAPTIONS[n]) for n in ("train_batch.jpg",
                                                                                           "lr_find.png")) if p]},
        "reports": [_report_section(folder, part, report, evaluation) for part, report in contents["parts"].items()],
    }  # fmt: skip
    history = contents["history"]
    if history:
        columns = list(history[0])
        context["epochs"] = {"columns": columns, "rows": [[_number(row[c], 4) if c != "epoch" else row[c]
                                                           for c in columns] for row in history]}  # fmt: skip
    folds = contents["folds"]
    if folds:
        columns = list(folds[0])
        context["folds"] = {
            "columns": columns,
            "rows": [[_number(row[c]) for c in columns] for row in folds],
            "links": sorted(f"{d.name}/report.html" for d in folder.glob("fold*") if d.is_dir()),
        }
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    context["files"] = [{"name": p.name, "what": FILE_DESCRIPTIONS.get(p.name, PICTURE_CAPTIONS.get(
        p.name.removeprefix("test_"), "")), "size": _size(p)} for p in files]  # fmt: skip
    return context


def _environment(autoescape):
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=autoescape,
                              trim_blocks=True, lstrip_blocks=True)  # fmt: skip


def write_page(output_dir, state=None):
    """report.html: the run folder on one self-contained page (pictures embedded, no internet), from
    templates/report.html. Refreshed after every epoch (`state` says how far the run is) and at the end; a
    page that cannot be written is a warning, never a stopped run."""
    import jinja2

    try:
        html = _environment(autoescape=True).get_template("report.html").render(**page_context(output_dir, state))
        write_atomically(Path(output_dir) / "report.html", lambda f: f.write(html.encode()))
    except (WriteError, OSError, ValueError, KeyError, jinja2.TemplateError) as e:  # the run goes on without it
        print(f"warning: could not write report.html ({one_line(e)[:200]})", file=sys.stderr)


def _plural(count, word):
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('s') else 's'}"


OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD with momentum"}
METRIC_NAMES = {"acc": "accuracy", "macro_f1": "macro-F1", "auc": "macro AUC", "map": "mAP", "loss": "loss"}


def methods_context(output_dir):
    """The sentences of methods.md, each from the run's own settings and results (see templates/methods.md)."""
    import platform

    from intervals import BOOTSTRAP_MIN_RESAMPLES, bootstrap_resamples

    contents = run_contents(output_dir)
    args, split, parts = contents["args"], contents["split"], contents["parts"]
    sizes = {p: sum(row["split"] == p for row in split) for p in ("train", "val", "test")}
    classes = sorted({row["label"] for row in split})
    source = Path(args.get("csv") or args.get("data") or "the data").name
    data = (f"We used {_plural(len(split), 'image')} from {source} in {_plural(len(classes), 'class')} "
            f"({', '.join(classes)}): {sizes['train']} for training and {sizes['val']} for validation "
            f"({args.get('split_method', 'split')}).")  # fmt: skip
    if args.get("group_col") or args.get("group_pattern"):
        data += f" Images were grouped by {args.get('group_col') or 'the file-name pattern ' + args['group_pattern']}, "
        data += "so that no group (patient) had images in two parts."
    if sizes["test"]:
        data += f" A test set of {_plural(sizes['test'], 'image')} was evaluated once, with the final model."
    if contents["duplicates"]:
        done = "removed from the later part" if args.get("dedupe") else "kept and reported"
        data += f" {_plural(len(contents['duplicates']), 'pair')} of duplicate images across parts were {done}."
    size = args.get("image_size")
    augment = {"basic": "", "trivial": ", TrivialAugment", "randaugment": ", RandAugment", "augmix": ", AugMix"}
    preprocessing = (f"Training images were cropped at random (RandomResizedCrop, {args.get('crop_scale')} to 1 of "
                     f"the area) to {size} x {size} pixels and flipped horizontally at random"
                     f"{augment.get(args.get('augment'), '')}; validation and test images were resized and "
                     f"centre-cropped to {size} x {size} pixels.")  # fmt: skip
    if args.get("mixup") or args.get("cutmix"):
        preprocessing += f" MixUp (alpha {args.get('mixup')}) and CutMix (alpha {args.get('cutmix')}) mixed batches."
    if args.get("window"):
        preprocessing += f" DICOM grey values were windowed at {args['window']}."
    weights = args.get("weights")
    initial = f"initialised with the pretrained weights {weights}" if weights else "initialised at random"
    model = f"A {args.get('model')} (torchvision), {initial}, with its classification layer replaced by one with "
    model += (
        f"{_plural(len(classes), 'output')}"
        + (" (only this layer was trained)" if args.get("freeze_backbone") else "")
        + "."
    )
    schedule = {"none": "a constant learning rate", "cosine": "a cosine schedule", "step": "a step schedule (x0.1 "
                "every third of the run)"}.get(args.get("lr_schedule"), "")  # fmt: skip
    optimizer = OPTIMIZER_NAMES.get(args.get("optimizer"))
    smoothing = f" with label smoothing {args['label_smoothing']}" if args.get("label_smoothing") else ""
    training = (f"The model was trained for {_plural(len(contents['history']), 'epoch')} with {optimizer} "
                f"(learning rate {args.get('lr')}, weight decay {args.get('weight_decay')}) and {schedule}, batch "
                f"size {args.get('global_batch', args.get('batch_size'))}, minimising the cross-entropy loss"
                f"{smoothing}, in {args.get('precision', 'fp32')} on {args.get('device')}, "
                f"seed {args.get('seed')}.")  # fmt: skip
    selection = f"The epoch with the best validation {METRIC_NAMES.get(args.get('best_metric'))} was kept."
    temperature = next((row["value"] for row in parts.get("validation", {}).get("rows", [])
                        if row["label"] == "temperature"), None)  # fmt: skip
    if temperature:
        selection += (f" One temperature (T = {float(temperature):.3f}) was then fitted on the validation logits by "
                      "minimising the negative log-likelihood (temperature scaling).")  # fmt: skip
    elif args.get("calibrate") and parts.get("validation"):
        selection += " No temperature was fitted: every validation image was classified correctly."
    if args.get("operating_point"):
        selection += (f" The decision threshold ({args['operating_point']} operating point, one-vs-rest per "
                      "class) was chosen on the validation predictions and frozen before the test set was "
                      "evaluated.")  # fmt: skip
    count = sizes["val"] or len(split)
    statistics = ("95% confidence intervals: Wilson score intervals for proportions (accuracy, sensitivity, "
                  "specificity, PPV, NPV; Clopper-Pearson where the count is 0 or n), and percentile bootstrap "
                  f"intervals over {max(bootstrap_resamples(count), BOOTSTRAP_MIN_RESAMPLES):,} resamples of the "
                  "images for F1, AUC and calibration error.")  # fmt: skip
    software = (f"Python {platform.python_version()}, PyTorch {args.get('torch')}, torchvision "
                f"{args.get('torchvision')}.")  # fmt: skip
    return {
        "data_sentence": data, "preprocessing_sentence": preprocessing, "model_sentence": model,
        "training_sentence": training, "selection_sentence": selection, "statistics_sentence": statistics,
        "software_sentence": software, "results_sentence": _results_sentence(parts),
    }  # fmt: skip


def _results_sentence(parts):
    sentences = []
    for part, report in parts.items():
        rows = {row["label"]: row for row in report["rows"]}
        scores = [f"{name} {_summary_value(rows[key])}"
                  for key, name in (("accuracy", "accuracy"), ("macro auc", "macro AUC"), ("map", "mAP"))
                  if key in rows and rows[key]["value"] != ""]  # fmt: skip
        count = rows.get("accuracy", rows.get("exact match", {})).get("support", "?")
        sentence = f"On the {part} set ({count} images) the model reached {', '.join(scores)} (95% CI)."
        operating = [row for row in report["rows"] if row.get("threshold") and row.get("op_sensitivity")]
        for row in operating:
            sentence += (f" At its operating point, {row['label']} had sensitivity {_with_ci(row, 'op_sensitivity')} "
                         f"and specificity {_with_ci(row, 'op_specificity')}.")  # fmt: skip
        if part == "validation":
            sentence += (
                " These validation figures are optimistic: the epoch and the operating point were chosen on them."
            )
        sentences.append(sentence)
    return " ".join(sentences)


def write_methods(output_dir):
    """methods.md: the methods paragraph a paper can start from and the results sentence with intervals, every
    number from the run's files (templates/methods.md). A write failure is a warning."""
    import jinja2

    try:
        text = _environment(autoescape=False).get_template("methods.md").render(**methods_context(output_dir))
        write_atomically(Path(output_dir) / "methods.md", lambda f: f.write(text.encode()))
    except (WriteError, OSError, ValueError, KeyError, jinja2.TemplateError) as e:
        print(f"warning: could not write methods.md ({one_line(e)[:200]})", file=sys.stderr)
