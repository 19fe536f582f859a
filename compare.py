"""Compare two models on the same images, from the predictions CSVs their runs wrote.

    python compare.py runs/exp1/test_predictions.csv runs/exp2/test_predictions.csv
    python compare.py A/val_predictions.csv B/val_predictions.csv --names resnet18 resnet50 --out compare/
    python compare.py A/best.pt B/best.pt --csv external.csv --root images   # each evaluated on the CSV first

Writes OUT/compare.csv (metric, a, b, difference = a - b, its 95% paired-bootstrap interval, and for the AUC
DeLong's test p-value) and OUT/compare_roc.png (both ROC curves), and prints the table. Rows: accuracy, the
AUC (binary: of the positive class; multi-class: each class one-vs-rest and the macro average) and, when both
files have the `decision` column of a frozen operating point, sensitivity and specificity at those points.
The images are paired by path: both files must hold the same images with the same labels. Two checkpoints
are first evaluated on the --csv (or --data) images with `train.py --evaluate`, into OUT/a and OUT/b. Compare on test or
external predictions: validation ones chose each model's best epoch and operating point.
"""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import cli
import metrics
import paired
import plots
from errors import DataError, UsageError
from files import WriteError, write_atomically, write_csv_atomically

HERE = Path(__file__).resolve().parent
COLUMNS = ["metric", "a", "b", "difference", "ci_low", "ci_high", "p_value", "method"]


def get_args_parser():
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument(
        "predictions",
        nargs=2,
        help="the two predictions CSVs (val_, test_ or an --evaluate folder's), or two checkpoints",
    )
    parser.add_argument("--csv", help="with two checkpoints: the labelled images to evaluate both on")
    parser.add_argument("--root", help="with --csv: the folder its image paths are relative to (default: its own)")
    parser.add_argument("--data", help="with two checkpoints: a folder of class folders to evaluate both on")
    parser.add_argument("--names", nargs=2, default=["A", "B"], help="what the table calls the two models")
    parser.add_argument("--positive-class", help="binary: the class sensitivity is about (default: the second)")
    parser.add_argument("--out", default="compare", help="folder for compare.csv and compare_roc.png")
    return parser


def read_predictions(path):
    """{image: (label, probabilities, decision or None)} and the class names (the p_<class> columns)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    classes = [name.removeprefix("p_") for name in header if name.startswith("p_")]
    if "image" not in header or "label" not in header or len(classes) < 2:
        raise DataError(f"{path}: not a predictions CSV of train.py (needs image, label and p_<class> columns)")
    table = {}
    for line, row in enumerate(rows, 2):
        try:
            probabilities = [float(row[f"p_{name}"]) for name in classes]
        except ValueError:
            raise DataError(f"{path} line {line}: a p_ column is not a number") from None
        table[row["image"]] = (row["label"], probabilities, row.get("decision"))
    return table, classes


def paired_rows(a, b, classes, positive):
    """compare.csv's rows for the images of `a` and `b` (same keys, same labels)."""
    images = sorted(a)
    labels = np.array([classes.index(a[image][0]) for image in images])
    probs_a = np.array([a[image][1] for image in images])
    probs_b = np.array([b[image][1] for image in images])
    rows = []
    correct_a, correct_b = probs_a.argmax(1) == labels, probs_b.argmax(1) == labels

    def accuracy_difference(weights):
        return (weights @ correct_a - weights @ correct_b) / weights.sum(1)

    low, high = paired.paired_bootstrap(accuracy_difference, labels)
    rows.append({"metric": "accuracy", "a": correct_a.mean(), "b": correct_b.mean(),
                 "difference": correct_a.mean() - correct_b.mean(), "ci_low": low, "ci_high": high,
                 "method": "paired bootstrap"})  # fmt: skip
    auc_classes = [positive] if positive is not None else range(len(classes))
    for c in auc_classes:
        is_c = labels == c
        if is_c.all() or not is_c.any():
            continue
        test = paired.delong(probs_a[:, c], probs_b[:, c], is_c)

        def auc_difference(weights, c=c, is_c=is_c):
            return metrics.weighted_auc(probs_a[:, c], is_c, weights) - metrics.weighted_auc(
                probs_b[:, c], is_c, weights
            )

        low, high = paired.paired_bootstrap(auc_difference, labels)
        name = "auc" if positive is not None else f"auc {classes[c]}"
        rows.append({"metric": name, "a": test["auc_a"], "b": test["auc_b"], "difference": test["difference"],
                     "ci_low": low, "ci_high": high, "p_value": test["p_value"],
                     "method": "paired bootstrap; DeLong p"})  # fmt: skip
    decisions = [[a[image][2] for image in images], [b[image][2] for image in images]]
    if positive is not None and all(None not in d and "" not in d for d in decisions):
        decided_a, decided_b = (np.array(d) == classes[positive] for d in decisions)
        for name, members in (("sensitivity", labels == positive), ("specificity", labels != positive)):
            if not members.any():
                continue
            right_a = decided_a == (labels == positive)
            right_b = decided_b == (labels == positive)

            def share_difference(weights, members=members, right_a=right_a, right_b=right_b):
                w = weights * members
                return (w @ right_a - w @ right_b) / w.sum(1)

            low, high = paired.paired_bootstrap(share_difference, labels)
            value_a, value_b = right_a[members].mean(), right_b[members].mean()
            rows.append({"metric": f"{name} at the frozen operating point", "a": value_a, "b": value_b,
                         "difference": value_a - value_b, "ci_low": low, "ci_high": high,
                         "method": "paired bootstrap"})  # fmt: skip
    return rows, labels, probs_a, probs_b


def evaluated(args):
    """The predictions CSVs to compare: the two given, or those `train.py --evaluate` writes for two checkpoints
    on --csv / --data (OUT/a, OUT/b), each process's error passed on as it said it."""
    checkpoints = [Path(path).suffix == ".pt" for path in args.predictions]
    if not any(checkpoints):
        if args.csv or args.data:
            raise UsageError("--csv and --data are for two checkpoints; predictions CSVs hold their images already")
        return args.predictions
    if not all(checkpoints) or not (args.csv or args.data) or (args.csv and args.data):
        raise UsageError("give two .pt checkpoints with --csv (or --data) to evaluate them on, or two predictions CSVs")
    source = ["--data", args.data] if args.data else ["--csv", args.csv] + (["--root", args.root] if args.root else [])
    paths = []
    for checkpoint, name in zip(args.predictions, ("a", "b")):
        folder = Path(args.out) / name
        command = [
            sys.executable,
            str(HERE / "train.py"),
            "--evaluate",
            checkpoint,
            *source,
            "--output-dir",
            str(folder),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            said = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise DataError(f"evaluating {checkpoint}: {said[0].removeprefix('error: ')}")
        paths.append(str(folder / "val_predictions.csv"))
    return paths


def main(args):
    args.predictions = evaluated(args)
    (a, classes), (b, classes_b) = (read_predictions(path) for path in args.predictions)
    first, second = args.predictions
    if classes != classes_b:
        raise DataError(f"{first} and {second} have different classes ({', '.join(classes)} / {', '.join(classes_b)})")
    missing = sorted(set(a) ^ set(b))
    if missing:
        raise DataError(f"{first} and {second} are not the same images (e.g. {missing[0]}); compare on one set")
    different = next((image for image in a if a[image][0] != b[image][0]), None)
    if different is not None:
        raise DataError(f"{different}: labelled {a[different][0]!r} in {first} but {b[different][0]!r} in {second}")
    if args.positive_class is not None and (len(classes) != 2 or args.positive_class not in classes):
        raise UsageError(f"--positive-class {args.positive_class}: not a class of these binary predictions")
    positive = classes.index(args.positive_class or classes[1]) if len(classes) == 2 else None
    rows, labels, probs_a, probs_b = paired_rows(a, b, classes, positive)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    write_csv_atomically(out / "compare.csv", COLUMNS, rows)
    shown = positive if positive is not None else 0
    curves, aucs = [], []
    for probs in (probs_a, probs_b):
        predictions = metrics.Predictions(torch.arange(len(labels)), torch.tensor(labels),
                                          torch.tensor(probs).clamp_min(1e-300).log())  # fmt: skip
        curves.append(metrics.roc_curves(predictions)[shown])
        aucs.append(metrics.class_scores(predictions)["auc"][shown])
    picture = plots.draw_roc(curves, aucs, [f"{name}: {classes[shown]}" for name in args.names], "compare_")
    if picture is not None:
        write_atomically(out / picture.name, lambda f: f.write(picture.data))
    print(f"{args.names[0]} = {first}, {args.names[1]} = {second}: {len(labels)} images")
    for row in rows:
        p = f", DeLong p = {row['p_value']:.3g}" if row.get("p_value") is not None else ""
        print(f"{row['metric']}: {row['a']:.3f} vs {row['b']:.3f}, difference {row['difference']:+.3f} "
              f"(95% CI {row['ci_low']:+.3f} to {row['ci_high']:+.3f}){p}")  # fmt: skip
    print(f"wrote {out / 'compare.csv'}")
    return 0


def run_cli(argv=None):
    """Parse the command line and run; user mistakes become one `error:` line and exit status 2."""
    try:
        return main(get_args_parser().parse_args(sys.argv[1:] if argv is None else argv))
    except (UsageError, DataError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
