"""Everything computed from a run's per-image predictions: the confusion matrix, per-class scores (precision,
recall, specificity, F1, one-vs-rest ROC AUC), accuracy and top-k, expected calibration error, 95% bootstrap
intervals, and the classification report's text. Multi-label predictions (one probability per class, several
classes per image) have their own scores: per class average precision, ROC AUC and F1 at a threshold chosen on
the validation images, and mAP, micro/macro F1 and exact-match accuracy over them (see `label_report`).

The point estimates come from torchmetrics (imported when first needed: it takes seconds to import, and
predict.py and export.py never need it). The bootstrap re-weights the evaluated images instead of copying them:
1,000 resamples, each drawn within every class (stratified, so every resample has every class in its original
count) and seeded, so the same predictions always give the same interval. The resampled scores are computed
all at once from the resampling counts; tests check them against torchmetrics on the resamples written out.
"""

import unicodedata
from dataclasses import dataclass

import numpy as np
import torch

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
REPORT_COLUMNS = ["label", "support", "precision", "recall", "specificity", "f1", "auc", "value", "ci_low", "ci_high"]
LABEL_REPORT_COLUMNS = ["label", "support", "precision", "recall", "f1", "ap", "auc", "threshold", "value"]
DEFAULT_THRESHOLD = 0.5  # a class without positive validation images keeps it


@dataclass
class Predictions:
    """What a model said of each evaluated image, in dataset order: dataset indices, true classes (N,) and
    log-probabilities (N, C). Images that could not be decoded are not in it. Multi-label: `labels` are (N, C)
    multi-hot rows (NaN where unknown), `logits` the model's outputs and log_probabilities their log-sigmoid."""

    indices: torch.Tensor
    labels: torch.Tensor
    log_probabilities: torch.Tensor
    logits: torch.Tensor | None = None

    def __len__(self):
        return len(self.labels)

    @property
    def multi_label(self):
        return self.labels.ndim == 2

    @property
    def probabilities(self):
        return self.log_probabilities.exp()

    @property
    def predicted(self):
        return self.log_probabilities.argmax(1)

    @property
    def confidence(self):
        return self.log_probabilities.max(1).values.exp()


def epoch_scores(predictions, thresholds=None):
    """The numbers each epoch records (metrics.csv) and --best-metric chooses by: loss, accuracy, macro-F1,
    macro AUC (NaN when no class has both positive and negative images); multi-label (at `thresholds`): the
    same, accuracy being exact-match, and mAP."""
    if predictions.multi_label:
        summary = label_summary(predictions, label_scores(predictions, thresholds))
        return {
            "val_loss": mean_loss(predictions),
            "val_acc": summary["exact match"],
            "val_macro_f1": summary["macro f1"],
            "val_auc": summary["macro auc"],
            "val_map": summary["map"],
        }
    scores = class_scores(predictions)
    return {
        "val_loss": mean_loss(predictions),
        "val_acc": accuracy(predictions),
        "val_macro_f1": macro_average(scores, "f1"),
        "val_auc": macro_average(scores, "auc"),
    }


def mean_loss(predictions):
    """The plain cross-entropy over the images, comparable across training settings (multi-label: binary
    cross-entropy, the mean over the known labels)."""
    if predictions.multi_label:
        known = ~predictions.labels.isnan()
        logits, labels = predictions.logits[known].double(), predictions.labels[known].double()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) if known.any() else 0.0
        return not_below_zero(float(loss))
    total = -predictions.log_probabilities.gather(1, predictions.labels[:, None]).sum().item()
    return not_below_zero(total / max(len(predictions), 1))


def not_below_zero(loss):
    """A loss that rounding took just below 0 as 0 (it would print -0.000); NaN stays NaN, to be seen."""
    return 0.0 if loss < 0 else loss


def accuracy(predictions):
    return (predictions.predicted == predictions.labels).sum().item() / max(len(predictions), 1)


def class_scores(predictions):
    """Per class: support, precision, recall, specificity, F1 and one-vs-rest ROC AUC (floats in lists).

    Precision is 0 for a class never predicted (as scikit-learn's zero_division=0). Specificity is NaN for a
    class with no negative image, AUC for a class without both positive and negative images: undefined, not 0.
    """
    from torchmetrics.functional import classification as tm

    probabilities, labels = predictions.probabilities, predictions.labels
    num_classes = probabilities.shape[1]
    support = torch.bincount(labels, minlength=num_classes)
    scores = {"support": support.tolist()}
    for name, score in (
        ("precision", tm.multiclass_precision),
        ("recall", tm.multiclass_recall),
        ("specificity", tm.multiclass_specificity),
        ("f1", tm.multiclass_f1_score),
    ):
        scores[name] = score(probabilities, labels, num_classes, average=None).tolist()
    negatives = len(labels) - support
    scores["specificity"] = [s if n > 0 else float("nan") for s, n in zip(scores["specificity"], negatives.tolist())]
    scores["auc"] = [
        tm.binary_auroc(probabilities[:, c], (labels == c).long()).item()
        if 0 < support[c] < len(labels)
        else float("nan")
        for c in range(num_classes)
    ]
    return scores


def macro_average(scores, name, weighted=False):
    """Mean of a per-class score over the classes present (support > 0) where it is defined; weighted by
    support with `weighted`. NaN when no class has it."""
    values = np.array(scores[name], dtype=float)
    weights = np.array(scores["support"], dtype=float) * ~np.isnan(values)
    if not weighted:
        weights = (weights > 0).astype(float)
    return float((np.nan_to_num(values) * weights).sum() / weights.sum()) if weights.sum() > 0 else float("nan")


def confusion_matrix(predictions):
    """(C, C) counts, rows: true class, columns: predicted."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    num_classes = predictions.log_probabilities.shape[1]
    return multiclass_confusion_matrix(predictions.probabilities, predictions.labels, num_classes)


def topk_accuracy(predictions, k):
    from torchmetrics.functional.classification import multiclass_accuracy

    num_classes = predictions.log_probabilities.shape[1]
    return multiclass_accuracy(
        predictions.probabilities, predictions.labels, num_classes, top_k=k, average="micro"
    ).item()


def expected_calibration_error(predictions, bins=ECE_BINS):
    """The share-weighted gap between confidence and accuracy over `bins` equal-width confidence bins."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    num_classes = predictions.log_probabilities.shape[1]
    probabilities, labels = predictions.probabilities, predictions.labels
    return multiclass_calibration_error(probabilities, labels, num_classes, n_bins=bins, norm="l1").item()


def calibration_bins(predictions, bins=ECE_BINS):
    """The reliability diagram's table: per equal-width confidence bin [lower, upper) (the last one closed),
    its image count, mean confidence and accuracy (NaN for an empty bin)."""
    confidence = predictions.confidence.double()
    correct = (predictions.predicted == predictions.labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    mean_confidence = torch.bincount(which, confidence, minlength=bins) / count
    accuracy = torch.bincount(which, correct, minlength=bins) / count
    return {"edges": edges.tolist(), "count": count.long().tolist(), "confidence": mean_confidence.tolist(),
            "accuracy": accuracy.tolist()}  # fmt: skip


def roc_curves(predictions):
    """Per class, (false positive rates, true positive rates) of its one-vs-rest ROC curve; None where the
    class has no positive or no negative image."""
    from torchmetrics.functional.classification import binary_roc

    curves = []
    for c in range(predictions.log_probabilities.shape[1]):
        if predictions.multi_label:
            probabilities, positive = _known(predictions, c)
        else:
            probabilities, positive = predictions.probabilities[:, c], predictions.labels == c
        if 0 < int(positive.sum()) < len(positive):
            fpr, tpr, _ = binary_roc(probabilities, positive.long())
            curves.append((fpr.tolist(), tpr.tolist()))
        else:
            curves.append(None)
    return curves


# ----------------------------------------------------------------------------------------- multi-label


def choose_thresholds(predictions, fixed=None):
    """Per class, the probability threshold (predicted when probability >= it) with the highest F1 on these
    predictions, the validation images; DEFAULT_THRESHOLD for a class without positive images; `fixed` for
    every class when given (--threshold)."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    num_classes = predictions.labels.shape[1]
    if fixed is not None:
        return [float(fixed)] * num_classes
    thresholds = []
    for c in range(num_classes):
        probabilities, labels = _known(predictions, c)
        if not labels.any():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, cuts = binary_precision_recall_curve(probabilities, labels.long())
        f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0)[:-1]  # the last point has no threshold
        thresholds.append(float(cuts[int(f1.argmax())]))
    return thresholds


def _known(predictions, c):
    """(probabilities, bool labels) of class c over the images whose label for it is known."""
    known = ~predictions.labels[:, c].isnan()
    return predictions.probabilities[known, c], predictions.labels[known, c] > 0.5


def predicted_sets(predictions, thresholds):
    """(N, C) bool: the classes predicted for each image, those whose probability reaches their threshold."""
    return predictions.probabilities >= torch.tensor(thresholds)


def label_scores(predictions, thresholds):
    """Per class: support (positive images), precision, recall and F1 at its threshold, average precision and
    ROC AUC (torchmetrics), and the threshold. Precision is 0 for a class never predicted; AP is NaN without
    positives, AUC without both positives and negatives."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    scores = {key: [] for key in ("support", "tp", "fp", "fn", "precision", "recall", "f1", "ap", "auc")}
    for c, threshold in enumerate(thresholds):
        probabilities, positive = _known(predictions, c)
        predicted = probabilities >= threshold
        tp, fp, fn = (int(x.sum()) for x in (predicted & positive, predicted & ~positive, ~predicted & positive))
        support = int(positive.sum())
        scores["support"].append(support), scores["tp"].append(tp), scores["fp"].append(fp), scores["fn"].append(fn)
        scores["precision"].append(tp / (tp + fp) if tp + fp else 0.0)
        scores["recall"].append(tp / support if support else float("nan"))
        scores["f1"].append(2 * tp / (2 * tp + fp + fn) if support else float("nan"))
        scores["ap"].append(
            binary_average_precision(probabilities, positive.long()).item() if support else float("nan")
        )
        defined = 0 < support < len(positive)
        scores["auc"].append(binary_auroc(probabilities, positive.long()).item() if defined else float("nan"))
    scores["threshold"] = list(thresholds)
    return scores


def label_summary(predictions, scores):
    """mAP, macro AUC and macro F1 (means over the classes where they are defined), micro F1 (from the counts
    of all classes together) and exact-match accuracy (every known label of an image right)."""
    tp, fp, fn = (sum(scores[key]) for key in ("tp", "fp", "fn"))
    known = ~predictions.labels.isnan()
    agree = (predicted_sets(predictions, scores["threshold"]) == (predictions.labels > 0.5)) | ~known
    return {
        "map": _defined_mean(scores["ap"]),
        "macro auc": _defined_mean(scores["auc"]),
        "micro f1": 2 * tp / (2 * tp + fp + fn) if tp + fn else float("nan"),
        "macro f1": _defined_mean(scores["f1"]),
        "exact match": agree.all(1).double().mean().item() if len(predictions) else float("nan"),
    }


def _defined_mean(values):
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def pr_curves(predictions):
    """Per class, (recall, precision) of its precision-recall curve; None where it has no positive image."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    curves = []
    for c in range(predictions.labels.shape[1]):
        probabilities, positive = _known(predictions, c)
        if positive.any():
            precision, recall, _ = binary_precision_recall_curve(probabilities, positive.long())
            curves.append((recall.tolist(), precision.tolist()))
        else:
            curves.append(None)
    return curves


def label_report(predictions, class_names, thresholds):
    """The multi-label report's rows (LABEL_REPORT_COLUMNS): one per class, the macro average, then one per
    summary score (label_summary)."""
    scores = label_scores(predictions, thresholds)
    columns = ("support", "precision", "recall", "f1", "ap", "auc", "threshold")
    rows = [{"label": name, **{key: scores[key][c] for key in columns}} for c, name in enumerate(class_names)]
    present = [row for row in rows if row["support"] > 0]
    averages = {key: _defined_mean([row[key] for row in present]) for key in ("precision", "recall", "f1", "ap", "auc")}
    rows.append({"label": "macro avg", "support": sum(scores["support"]), **averages})
    for label, value in label_summary(predictions, scores).items():
        rows.append({"label": label, "support": len(predictions), "value": value})
    return rows


def label_report_text(title, loss, rows, class_names):
    """The console report of a multi-label model: per-class scores, their average and the summary line."""
    columns = ("precision", "recall", "f1", "ap", "auc", "threshold")
    table_rows = [row for row in rows if row["label"] in (*class_names, "macro avg")]
    width = max(12, *(display_width(row["label"]) for row in table_rows))
    images = next(row["support"] for row in rows if row["label"] == "map")
    lines = [f"\n{title}: {images} images, loss {loss:.3f}"]
    lines.append(f"{'':>{width}}  " + "  ".join(f"{c:>9}" for c in columns) + f"  {'support':>7}")
    for row in table_rows:
        cells = [f"{row[c]:9.3f}" if np.isfinite(row.get(c, np.nan)) else f"{'-':>9}" for c in columns]
        lines.append(f"{pad(row['label'], width)}  {'  '.join(cells)}  {row['support']:>7}")
    summary = {row["label"]: row["value"] for row in rows if "value" in row}
    names = {"map": "mAP", "macro auc": "macro AUC", "micro f1": "micro-F1", "macro f1": "macro-F1",
             "exact match": "exact match"}  # fmt: skip
    lines.append(", ".join(f"{names[k]} {v:.3f}" if np.isfinite(v) else f"{names[k]} n/a" for k, v in summary.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- bootstrap


def bootstrap_counts(labels, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """(resamples, N) int: how often each image is drawn in each resample. Each class's images are drawn with
    replacement as many times as the class has images, so every resample keeps the class counts."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    flat_draws = []  # resample * N + image, for every draw
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        drawn = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        flat_draws.append((np.arange(resamples)[:, None] * len(labels) + drawn).ravel())
    flat_draws = np.concatenate(flat_draws) if flat_draws else np.zeros(0, np.int64)
    return np.bincount(flat_draws, minlength=resamples * len(labels)).reshape(resamples, len(labels))


def resampled_scores(predictions, counts):
    """Accuracy, macro-F1 and macro AUC of each resample that `counts` describes (arrays of len(counts)),
    computed as the same scores of the images repeated that often."""
    labels = predictions.labels.numpy()
    predicted = predictions.predicted.numpy()
    probabilities = predictions.probabilities.double().numpy()
    weights = counts.astype(np.float64)
    correct = predicted == labels
    accuracy = weights @ correct / weights.sum(1)
    f1s, aucs = [], []
    for c in range(probabilities.shape[1]):
        positive = labels == c
        drawn_positive = weights @ positive
        if not positive.any():
            continue  # absent classes are left out of the macro averages, as in class_scores
        true_positive = weights @ (correct & positive)
        f1s.append(2 * true_positive / (drawn_positive + weights @ (predicted == c)))
        if positive.all():
            continue
        aucs.append(_weighted_auc(probabilities[:, c], positive, weights))
    macro_auc = np.mean(aucs, axis=0) if aucs else np.full(len(counts), np.nan)
    return {"accuracy": accuracy, "macro_f1": np.mean(f1s, axis=0), "macro_auc": macro_auc}


def _weighted_auc(scores, positive, weights):
    """ROC AUC per row of `weights` (image multiplicities): the weighted share of (positive, negative) pairs
    the scores order right, ties counting half (the Mann-Whitney statistic)."""
    order = np.argsort(scores, kind="stable")
    scores, positive, weights = scores[order], positive[order], weights[:, order]
    # Images with equal scores form a group: a positive beats the negatives of lower groups, ties its own.
    _, group, group_size = np.unique(scores, return_inverse=True, return_counts=True)
    group_end = np.cumsum(group_size) - 1
    negatives_up_to = np.cumsum(weights * ~positive, axis=1)[:, group_end]  # through each group's end
    negatives_below = np.concatenate([np.zeros((len(weights), 1)), negatives_up_to[:, :-1]], axis=1)
    negatives_tied = negatives_up_to - negatives_below
    wins = (weights * positive) * (negatives_below[:, group] + 0.5 * negatives_tied[:, group])
    pairs = (weights @ positive) * (weights @ ~positive)
    return wins.sum(1) / pairs


def bootstrap_intervals(predictions, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """95% percentile intervals {score: (low, high)} for accuracy, macro-F1 and macro AUC."""
    counts = bootstrap_counts(predictions.labels.numpy(), resamples, seed)
    chunk = max(1, 4_000_000 // max(len(predictions), 1))  # resamples at a time: bounded memory
    parts = [resampled_scores(predictions, counts[i : i + chunk]) for i in range(0, resamples, chunk)]
    intervals = {}
    for name in parts[0]:
        values = np.concatenate([part[name] for part in parts])
        finite = values[np.isfinite(values)]
        intervals[name] = tuple(np.percentile(finite, [2.5, 97.5]).tolist()) if len(finite) else (np.nan, np.nan)
    return intervals


# ---------------------------------------------------------------------------------------------- report


def report(predictions, class_names):
    """Everything the final report states: rows of report.csv (REPORT_COLUMNS; one per class, macro and
    weighted averages, then one per summary score with its interval), and the confusion matrix."""
    scores = class_scores(predictions)
    per_class = ("precision", "recall", "specificity", "f1", "auc")
    rows = [
        {"label": name, "support": scores["support"][c], **{key: scores[key][c] for key in per_class}}
        for c, name in enumerate(class_names)
    ]
    count = len(predictions)
    for label, weighted in (("macro avg", False), ("weighted avg", True)):
        averages = {key: macro_average(scores, key, weighted) for key in per_class}
        rows.append({"label": label, "support": count, **averages})
    intervals = bootstrap_intervals(predictions)
    summary = {
        "accuracy": (accuracy(predictions), intervals["accuracy"]),
        "macro f1": (macro_average(scores, "f1"), intervals["macro_f1"]),
        "macro auc": (macro_average(scores, "auc"), intervals["macro_auc"]),
        "ece": (expected_calibration_error(predictions), (None, None)),
    }
    for k in (2, 5):
        if k < len(class_names):
            summary[f"top{k} accuracy"] = (topk_accuracy(predictions, k), (None, None))
    for label, (value, (low, high)) in summary.items():
        rows.append({"label": label, "support": count, "value": value, "ci_low": low, "ci_high": high})
    return rows, confusion_matrix(predictions)


def summary_line(rows):
    """'accuracy 0.912 (95% CI 0.884-0.937), macro-F1 ..., macro AUC 0.981 (0.972-0.988), ECE 0.031'."""
    summary = {row["label"]: row for row in rows}

    def with_interval(label, name):
        row = summary[label]
        if not np.isfinite(row["value"]):
            return f"{name} n/a"
        return f"{name} {row['value']:.3f} ({row['ci_low']:.3f}-{row['ci_high']:.3f})"

    parts = [with_interval("accuracy", "accuracy").replace(" (", " (95% CI ", 1)]
    parts += [with_interval("macro f1", "macro-F1"), with_interval("macro auc", "macro AUC")]
    return ", ".join(parts) + f", ECE {summary['ece']['value']:.3f}"


def display_width(text):
    """Columns `text` takes in a terminal: wide (CJK) characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in str(text)
    )


def pad(text, width):
    """Right-align `text` in `width` terminal columns."""
    return " " * max(0, width - display_width(text)) + str(text)


def report_text(title, loss, rows, confusion, class_names):
    """The console report: per-class scores, averages, the summary line and the confusion matrix."""
    columns = ("precision", "recall", "specificity", "f1", "auc")
    table_rows = [row for row in rows if row["label"] in (*class_names, "macro avg", "weighted avg")]
    width = max(12, *(display_width(row["label"]) for row in table_rows))
    count = int(confusion.sum())
    lines = [f"\n{title}: {count} images, loss {loss:.3f}"]
    lines.append(f"{'':>{width}}  " + "  ".join(f"{c:>11}" for c in columns) + f"  {'support':>7}")
    for row in table_rows:
        cells = [f"{row[c]:11.3f}" if np.isfinite(row[c]) else f"{'-':>11}" for c in columns]
        lines.append(f"{pad(row['label'], width)}  {'  '.join(cells)}  {row['support']:>7}")
    lines.append(summary_line(rows))
    topk = [row for row in rows if row["label"].startswith("top")]
    if topk:
        lines[-1] += "; " + ", ".join(f"{row['label']} {row['value']:.3f}" for row in topk)
    cell = max(5, *(display_width(name) for name in class_names))
    lines.append(f"\nconfusion matrix (rows: true, columns: predicted)\n{'':>{width}}  "
                 + "  ".join(pad(n, cell) for n in class_names))  # fmt: skip
    for name, counts in zip(class_names, confusion.tolist()):
        lines.append(f"{pad(name, width)}  " + "  ".join(f"{c:>{cell}}" for c in counts))
    return "\n".join(lines)
