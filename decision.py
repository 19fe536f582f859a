"""What a trained model is deployed with, chosen once on the validation images and frozen: the temperature that
calibrates its probabilities and the operating point (a probability threshold per class) that turns them into
decisions, and the figures at that point (sensitivity, specificity, PPV, NPV with their intervals), overall and
per subgroup. train.py chooses them on best.pt's validation predictions and saves them in best.pt; export.py
copies them into the exported model's metadata; the test report, --evaluate and predict.py apply them as they
are, never tuned again on the images they are reported on.

Operating-point rules (--operating-point), each one-vs-rest per class on the (calibrated) probabilities, a
class decided when its probability is at or above its threshold:
- youden: the threshold of the largest sensitivity + specificity - 1 (the first, highest, of equals, as
  scikit-learn's roc_curve lists them);
- sens=0.95: the highest threshold whose sensitivity reaches 0.95 (the most specific such point);
- spec=0.90: the lowest threshold whose specificity reaches 0.90 (the most sensitive such point);
- f1: the threshold of the largest F1 (the lowest of equals, as the multi-label thresholds always were).
A binary model decides its positive class (the second class, or --positive-class) at its threshold.

The figures at a frozen threshold are binomial proportions, so their intervals are the proportion intervals
of intervals.py (Wilson; Clopper-Pearson at 0 or n); on the validation images they are optimistic, since the
threshold was chosen there.
"""

import math
import re
import sys

import numpy as np
import torch

import metrics
from intervals import proportion_interval, score_interval
from labels import LABEL_SEP

TEMPERATURE_RANGE = (0.05, 20.0)
# A chosen threshold is an image's probability; saved this much (relatively) below it, so that predict.py and
# ONNX, computing that image's probability in float32, decide it as the float64 report does (without it the
# image a threshold was chosen at came out below it in predict.py, measured on a tiny binary run).
FLOAT32_MARGIN = 1e-6
SMALL_SUBGROUP = 30  # below this many images (or without a positive) a subgroup's intervals are too wide to read
SUBGROUP_COLUMNS = ["column", "value", "class", "n", "positives", "prevalence", "auc", "auc_low", "auc_high",
                    "threshold", "sensitivity", "sensitivity_low", "sensitivity_high", "specificity",
                    "specificity_low", "specificity_high", "warning"]  # fmt: skip


def parse_rule(text):
    """The --operating-point rule in its saved spelling ('youden', 'f1', 'sens=0.95', 'spec=0.9'); ValueError
    says what is accepted."""
    rule = str(text).strip().lower()
    if rule in ("youden", "f1"):
        return rule
    found = re.fullmatch(r"(sens|spec)=([0-9.]+)", rule)
    if found:
        try:
            target = float(found.group(2))
        except ValueError:
            target = math.nan
        if 0 < target <= 1:
            return f"{found.group(1)}={target:g}"
    raise ValueError(f"must be youden, f1, sens=X or spec=X with 0 < X <= 1 (e.g. sens=0.95), got {text!r}")


def threshold_for(scores, positives, rule):
    """The probability threshold `rule` chooses for one class: `scores` its probabilities (N,), `positives`
    which images are of it (N, bool). NaN when the images lack positives or negatives (nothing to choose on)."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    ranked, is_positive = scores[order], positives[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]  # each distinct score's last row
    tp, fp = np.cumsum(is_positive)[last_of_each], np.cumsum(~is_positive)[last_of_each]
    cuts = ranked[last_of_each]  # descending: deciding "score >= cuts[i]" gives tp[i], fp[i]
    if len(cuts) == 0 or tp[-1] == 0 or fp[-1] == 0:
        return math.nan
    sensitivity, specificity = tp / tp[-1], 1 - fp / fp[-1]
    tolerance = 1e-12  # a target of 0.95 is met by 19 of 20 although 19/20 is 0.9499999... in floating point
    if rule == "youden":
        return float(cuts[int(np.argmax(sensitivity + specificity - 1))])
    if rule == "f1":
        f1 = 2 * tp / (tp + fp + tp[-1])
        return float(cuts[len(f1) - 1 - int(np.argmax(f1[::-1]))])
    kind, target = rule.split("=")
    if kind == "sens":
        return float(cuts[int(np.argmax(sensitivity >= float(target) - tolerance))])
    meets = np.flatnonzero(specificity >= float(target) - tolerance)
    # no threshold at an image's score is that specific: just above the highest, no image is decided positive
    return float(cuts[meets[-1]]) if len(meets) else float(np.nextafter(cuts[0], np.inf))


def choose_operating_point(predictions, rule, positive=None):
    """{"rule", "thresholds" (one per class, None where not chosen), "positive"}: single-label predictions'
    one-vs-rest thresholds by `rule` (FLOAT32_MARGIN below the probability chosen); binary (`positive` the
    positive class's index) only the positive class's. A class the images lack positives or negatives of gets
    no threshold."""
    probabilities, labels = predictions.probabilities.double().numpy(), predictions.labels.numpy()
    classes = [positive] if positive is not None else range(probabilities.shape[1])
    thresholds = [None] * probabilities.shape[1]
    for c in classes:
        threshold = threshold_for(probabilities[:, c], labels == c, rule)
        thresholds[c] = None if math.isnan(threshold) else threshold * (1 - FLOAT32_MARGIN)
    return {"rule": rule, "thresholds": thresholds, "positive": positive}


def choose_label_thresholds(predictions, rule, fixed=None):
    """Multi-label: each label's threshold by `rule` over the images whose label is known (the best F1 by
    default, metrics.choose_thresholds), FLOAT32_MARGIN below; metrics.DEFAULT_THRESHOLD where one cannot be
    chosen, `fixed` (--threshold) for every label when given."""
    if fixed is not None:
        return metrics.choose_thresholds(predictions, fixed)
    if rule == "f1":
        return [t * (1 - FLOAT32_MARGIN) for t in metrics.choose_thresholds(predictions)]
    thresholds = []
    for c in range(predictions.labels.shape[1]):
        known = ~predictions.labels[:, c].isnan()
        scores, labels = predictions.probabilities[known, c].numpy(), (predictions.labels[known, c] > 0.5).numpy()
        threshold = threshold_for(scores, labels, rule)
        thresholds.append(metrics.DEFAULT_THRESHOLD if math.isnan(threshold) else threshold * (1 - FLOAT32_MARGIN))
    return thresholds


def decided(probabilities, point):
    """(N, C) bool: the classes decided positive at the operating point, each at or above its threshold (a class
    without a threshold never)."""
    thresholds = torch.tensor([math.inf if t is None else t for t in point["thresholds"]], dtype=torch.float64)
    return probabilities.double() >= thresholds


def binary_decision(probabilities, point):
    """(N,) class index each image is decided as: a binary model's positive class at or above its threshold,
    the other class below; None for a multi-class model or one without a threshold."""
    positive = point.get("positive") if point else None
    if positive is None or point["thresholds"][positive] is None:
        return None
    return torch.where(decided(probabilities, point)[:, positive], positive, 1 - positive)


def decision_names(probabilities, point, class_names):
    """What the operating point decides for each image, as text: a binary model's class, or the classes at or
    above their thresholds joined by ';' (empty for none)."""
    binary = binary_decision(probabilities, point)
    if binary is not None:
        return [class_names[c] for c in binary.tolist()]
    return [LABEL_SEP.join(n for n, d in zip(class_names, row) if d) for row in decided(probabilities, point).tolist()]


def proportions(decided_positive, is_positive):
    """Sensitivity, specificity, PPV and NPV of decisions against the truth (bool arrays), each
    (value, low, high) with its proportion interval; value NaN where its denominator is 0."""
    decided_positive, is_positive = np.asarray(decided_positive, bool), np.asarray(is_positive, bool)
    tp = int((decided_positive & is_positive).sum())
    fp = int((decided_positive & ~is_positive).sum())
    fn = int((~decided_positive & is_positive).sum())
    tn = int((~decided_positive & ~is_positive).sum())
    figures = {}
    for name, hits, trials in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                               ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):  # fmt: skip
        low, high, _ = proportion_interval(hits, trials)
        figures[name] = (hits / trials if trials else math.nan, low, high)
    return figures


def operating_columns(predictions, point):
    """Per class, report.csv's threshold and op_* columns (metrics.OPERATING_COLUMNS) at the frozen point: {} for a
    class without a threshold."""
    chosen, labels = decided(predictions.probabilities, point).numpy(), predictions.labels.numpy()
    columns = []
    for c, threshold in enumerate(point["thresholds"]):
        if threshold is None:
            columns.append({})
            continue
        row = {"threshold": threshold}
        for name, (value, low, high) in proportions(chosen[:, c], labels == c).items():
            row[f"op_{name}"], row[f"op_{name}_low"], row[f"op_{name}_high"] = value, low, high
        columns.append(row)
    return columns


def operating_text(rows, point, class_names, chosen_here):
    """The console lines of the operating point: per class with a threshold, its figures with intervals."""
    where = "chosen on these images: optimistic" if chosen_here else "frozen on the validation images"
    lines = [f"operating point {point['rule']} ({where})"]
    for row, name in zip(rows, class_names):
        if row.get("threshold") is None:
            continue
        figures = ", ".join(
            metrics.with_interval({"value": row[f"op_{key}"], "ci_low": row[f"op_{key}_low"],
                                   "ci_high": row[f"op_{key}_high"]}, label)
            for key, label in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                               ("ppv", "PPV"), ("npv", "NPV"))
        )  # fmt: skip
        lines.append(f"  {name} at p >= {row['threshold']:.4g}: {figures}")
    return lines


# ------------------------------------------------------------------------------------ temperature scaling


def fit_temperature(predictions):
    """The temperature T that minimises the validation images' negative log-likelihood of softmax(logits / T)
    (Guo et al. 2017, "On Calibration of Modern Neural Networks"), by LBFGS on log T in float64. Fitted on
    log-probabilities, which are the logits up to a per-image constant that the softmax cancels. None when
    every image is right."""
    log_p = predictions.log_probabilities.double().clone()  # evaluate's tensors come from inference mode
    labels = predictions.labels.long().clone()
    if bool((log_p.argmax(1) == labels).all()):
        # Every image right: the NLL falls towards 0 as T does, and the fit would make every probability 0 or 1
        # (the sample's 72 validation images gave T = 0.09). Nothing to calibrate against: none.
        print("calibration: every validation image is right, so no temperature is fitted (--calibrate skipped)")
        return None
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    # The NLL is convex in 1 / T, so the bounded minimum is the unbounded one clipped. Bounded, because on
    # images the model separates perfectly the NLL falls towards 0 as T does, and T -> 0 would make every
    # probability 0 or 1.
    temperature = float(log_t.detach().exp())
    return min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1]) if math.isfinite(temperature) else 1.0


def with_temperature(predictions, temperature):
    """The same predictions with probabilities softmax(logits / T); argmax, and so accuracy, are unchanged."""
    if temperature is None or predictions.multi_label:
        return predictions
    scaled = (predictions.log_probabilities.double() / temperature).log_softmax(1)
    return metrics.Predictions(predictions.indices, predictions.labels, scaled)


def calibration_rows(uncalibrated, temperature):
    """report.csv's rows for the temperature and for NLL and ECE before it (the calibrated ones are the
    report's loss and ece)."""
    count = len(uncalibrated)
    rows = [{"label": "temperature", "support": count, "value": temperature}]
    calibrated_loss = metrics.mean_loss(with_temperature(uncalibrated, temperature))
    rows.append({"label": "nll", "support": count, "value": calibrated_loss})
    rows.append({"label": "nll before calibration", "support": count, "value": metrics.mean_loss(uncalibrated)})
    ece = metrics.expected_calibration_error(uncalibrated)
    rows.append({"label": "ece before calibration", "support": count, "value": ece})
    return rows


# ---------------------------------------------------------------------------------------------- subgroups


def subgroup_rows(predictions, values, class_names, point):
    """subgroups.csv (SUBGROUP_COLUMNS): per --subgroup-col column and value, per class (binary: the positive
    class), n, positives, prevalence, AUC with its bootstrap interval, and sensitivity and specificity with
    their proportion intervals at the frozen operating point (no point: at the most probable class).
    `values` maps each column to the value of every dataset image (indexed as predictions.indices).
    A subgroup under SMALL_SUBGROUP images, or without a positive or negative image, carries a warning."""
    positive = point.get("positive") if point else (1 if len(class_names) == 2 else None)
    classes = [positive] if positive is not None else range(len(class_names))
    if point is not None:
        chosen = decided(predictions.probabilities, point).numpy()
    else:
        chosen = np.eye(len(class_names), dtype=bool)[predictions.predicted.numpy()]
    labels, indices = predictions.labels.numpy(), predictions.indices.numpy()
    rows = []
    for column, column_values in values.items():
        of_image = np.asarray(column_values, dtype=object)[indices]
        for value in sorted(set(of_image), key=str):
            members = np.flatnonzero(of_image == value)
            sub = metrics.Predictions(
                predictions.indices[members], predictions.labels[members], predictions.log_probabilities[members]
            )
            scores, intervals = metrics.class_scores(sub), metrics.bootstrap_intervals(sub)
            for c in classes:
                is_positive = labels[members] == c
                figures = proportions(chosen[members, c], is_positive)
                positives = int(is_positive.sum())
                # the report's AUC interval: the bootstrap's, or where it collapses the proportion fallback
                bootstrap = (intervals["auc"][0][c], intervals["auc"][1][c])
                auc_low, auc_high, _ = score_interval(
                    scores["auc"][c], bootstrap, min(positives, len(members) - positives)
                )
                row = {"column": column, "value": value, "class": class_names[c], "n": len(members),
                       "positives": positives, "prevalence": float(is_positive.mean()), "auc": scores["auc"][c],
                       "auc_low": auc_low, "auc_high": auc_high,
                       "threshold": point["thresholds"][c] if point else None}  # fmt: skip
                for name in ("sensitivity", "specificity"):
                    row[name], row[f"{name}_low"], row[f"{name}_high"] = figures[name]
                if len(members) < SMALL_SUBGROUP or not 0 < row["positives"] < len(members):
                    row["warning"] = (
                        f"{len(members)} images, {row['positives']} positive: too few for a useful interval"
                    )
                rows.append(row)
    return rows


def warn_small_subgroups(rows):
    for row in rows:
        if row.get("warning"):
            where = f"subgroup {row['column']}={row['value']} ({row['class']})"
            print(f"warning: {where}: {row['warning']}", file=sys.stderr)
