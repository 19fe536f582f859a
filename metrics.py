"""Everything computed from a run's per-image predictions: the confusion matrix, per-class scores (precision,
recall, specificity, F1, one-vs-rest ROC AUC), accuracy and top-k, expected calibration error, their 95%
intervals, and the classification report's text. Multi-label predictions (one probability per class, several
classes per image) have their own scores: per class average precision, ROC AUC and F1 at a threshold chosen on
the validation images, and mAP, micro/macro F1 and exact-match accuracy over them (see `label_report`).

Point estimates: the confusion matrix, ECE and top-k come from torchmetrics (imported when first needed: it
takes seconds to import, and predict.py and export.py never need it); precision, recall, specificity and F1
are counted from that matrix, as scikit-learn's precision_recall_fscore_support does. Ranking scores (AUC, AP,
the ROC and PR curves) rank the images by each class's log-odds in float64 (`log_odds`), never by float32
probabilities, which round to 1.0 beyond a logit margin of 17 and would tie the most confident images.

Intervals (95%), in three kinds:
- Proportions (accuracy, top-k, per-class precision, recall, specificity, exact match): the Wilson score
  interval, or Clopper-Pearson's exact one when the count is 0 or n (`proportion_interval`).
- The other scores (F1, macro-F1, AUC, macro AUC, ECE, mAP, micro-F1): percentile bootstrap over 10,000
  resamples of the evaluated images (fewer above 300 images, see BOOTSTRAP_DRAWS), drawn without regard to
  class (the class counts of a validation or test split vary from one draw of the data to another;
  `stratified=True` keeps them where a study fixed them by design), seeded, so the same predictions always give
  the same interval. The resamples re-weight the images instead of copying them, and their scores are computed
  all at once from the counts; tests check them against torchmetrics on the resamples written out.
- Where the bootstrap collapses (every resample gives the same value, as at a perfect AUC or F1), the score
  gets the proportion interval of its value over the number of independent trials it rests on (`score_interval`).
"""

import math
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch

from intervals import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    bootstrap_resamples,
    draw_counts,
    percentiles,
    proportion_interval,
    score_interval,
    strata,
)

ECE_BINS = 15
# Below this many evaluated images the report says its figures are rough (`small_set_warning`). Measured with
# benchmarks/interval_coverage.py (3 classes, 300 sets each): a perfectly calibrated model's ECE averages 0.129
# at 50 images, 0.093 at 100, 0.065 at 200, 0.054 at 300 and 0.038 at 600; accuracy 0.90's 95% interval is
# 0.17 wide at 50 images, 0.084 at 200 and 0.068 at 300.
SMALL_SET = 200
# At the frozen operating point (decision.py): sensitivity, specificity, PPV and NPV with their intervals.
OPERATING_COLUMNS = [f"op_{name}{end}" for name in ("sensitivity", "specificity", "ppv", "npv")
                     for end in ("", "_low", "_high")]  # fmt: skip
REPORT_COLUMNS = ["label", "support", "precision", "recall", "specificity", "f1", "auc", "value", "ci_low", "ci_high",
                  "ci_method", "classes", "precision_low", "precision_high", "recall_low", "recall_high",
                  "specificity_low", "specificity_high", "f1_low", "f1_high", "auc_low", "auc_high",
                  "threshold", *OPERATING_COLUMNS]  # fmt: skip
LABEL_REPORT_COLUMNS = ["label", "support", "precision", "recall", "f1", "ap", "auc", "threshold", "value", "ci_low",
                        "ci_high", "ci_method", "classes", "precision_low", "precision_high", "recall_low",
                        "recall_high", "f1_low", "f1_high", "ap_low", "ap_high", "auc_low", "auc_high"]  # fmt: skip
DEFAULT_THRESHOLD = 0.5  # a class without positive validation images keeps it
NAN = float("nan")


@dataclass
class Predictions:
    """What a model said of each evaluated image, in dataset order: dataset indices, true classes (N,) and
    log-probabilities (N, C), float32 or float64. Images that could not be decoded are not in it. Multi-label:
    `labels` are (N, C) multi-hot rows (NaN where unknown), `logits` the model's outputs and log_probabilities
    their log-sigmoid."""

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

    @property
    def ranking_scores(self):
        """(N, C) float64: what AUC, AP and the curves rank the images by, each class's log-odds (multi-label:
        the logits, when given)."""
        if self.multi_label and self.logits is not None:
            return self.logits.double()
        return log_odds(self.log_probabilities, self.multi_label)


def log_odds(log_probabilities, independent=False):
    """(N, C) float64 log(p / (1 - p)) of each class: monotone in its probability, so it ranks the images as the
    probability does, without the ties rounding makes. The winning class's log-probability itself rounds to 0
    beyond a logit margin of 17 in float32 and 37 in float64; where it is that close to 0 (1 - p below the
    square root of its type's resolution), 1 - p is taken as the sum of the other classes' probabilities, which
    keeps its precision as their log-sum-exp. Elsewhere the score depends on log p alone, so that equal
    probabilities stay tied. `independent`: sigmoid outputs, each its own 1 - p."""
    log_p = log_probabilities.double()
    # log(1 - p) from log p: log1p(-exp) for p <= 1/2 and log(-expm1) above (Maechler 2012, "Accurately Computing
    # log(1 - exp(-|a|))"), each the precise branch.
    complement = torch.where(log_p < -math.log(2), torch.log1p(-log_p.exp()), torch.log(-torch.expm1(log_p)))
    if not independent and log_p.shape[1] > 1:
        top = log_p.argmax(1, keepdim=True)  # the only class that can be near 1
        others = log_p.scatter(1, top, -math.inf).logsumexp(1, keepdim=True)
        rounded = log_p.gather(1, top) > -(torch.finfo(log_probabilities.dtype).eps ** 0.5)
        complement = complement.scatter(1, top, torch.where(rounded, others, complement.gather(1, top)))
    return log_p - complement


def epoch_scores(predictions, thresholds=None):
    """The numbers each epoch records (metrics.csv) and --best-metric chooses by: loss, accuracy, macro-F1,
    macro AUC (NaN when no class has both positive and negative images); multi-label (at `thresholds`): the
    same, accuracy being exact-match, and mAP. No intervals: this runs after every epoch."""
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
    total = -predictions.log_probabilities.double().gather(1, predictions.labels[:, None]).sum().item()
    return not_below_zero(total / max(len(predictions), 1))


def not_below_zero(loss):
    """A loss that rounding took just below 0 as 0 (it would print -0.000); NaN stays NaN, to be seen."""
    return 0.0 if loss < 0 else loss


def accuracy(predictions):
    return (predictions.predicted == predictions.labels).sum().item() / max(len(predictions), 1)


def class_scores(predictions):
    """Per class (lists): support, the counts predicted/tp/fp/fn/tn, precision, recall, specificity, F1 and
    one-vs-rest ROC AUC.

    Precision is 0 for a class never predicted (scikit-learn's zero_division=0). A class without images in the
    evaluated data has no recall, F1 or AUC (NaN; its precision, 0 where it was predicted, is defined), a class
    without negatives no specificity, a class without both positives and negatives no AUC: undefined, not 0.
    """
    labels = predictions.labels
    num_classes = predictions.log_probabilities.shape[1]
    matrix = confusion_matrix(predictions).long()
    support, chosen, tp = matrix.sum(1), matrix.sum(0), matrix.diagonal()
    fp, fn = chosen - tp, support - tp
    tn = len(labels) - tp - fp - fn
    scores = {"support": support.tolist(), "predicted": chosen.tolist(), "tp": tp.tolist(), "fp": fp.tolist(),
              "fn": fn.tolist(), "tn": tn.tolist()}  # fmt: skip
    scores["precision"] = [t / p if p else 0.0 for t, p in zip(scores["tp"], scores["predicted"])]
    scores["recall"] = [t / s if s else NAN for t, s in zip(scores["tp"], scores["support"])]
    scores["specificity"] = [t / (t + f) if t + f else NAN for t, f in zip(scores["tn"], scores["fp"])]
    counts = zip(scores["tp"], scores["support"], scores["predicted"])
    scores["f1"] = [2 * t / (s + p) if s else NAN for t, s, p in counts]
    ranking = predictions.ranking_scores.numpy()
    unit = np.ones((1, len(labels)))
    scores["auc"] = [
        float(weighted_auc(ranking[:, c], (labels == c).numpy(), unit)[0]) if 0 < support[c] < len(labels) else NAN
        for c in range(num_classes)
    ]
    return scores


def _macro_members(scores, name):
    """The classes a macro average of `name` is over. Precision, recall and F1: those present or predicted, as
    scikit-learn's default (labels=None) has it, so that a class that is absent but predicted counts with its
    false positives (F1 0) instead of dropping out; the others: those present where the score is defined."""
    values = np.array(scores[name], dtype=float)
    present = np.array(scores["support"]) > 0
    if name in ("precision", "recall", "f1"):
        return present | (np.array(scores["predicted"]) > 0)
    return present & ~np.isnan(values)


def macro_average(scores, name, weighted=False):
    """Mean of a per-class score over the classes of `_macro_members` (an undefined score among them counting
    0, as in scikit-learn); weighted by support with `weighted`. NaN when there is no such class."""
    values = np.nan_to_num(np.array(scores[name], dtype=float))
    weights = _macro_members(scores, name).astype(float)
    if weighted:
        weights *= np.array(scores["support"], dtype=float)
    return float((values * weights).sum() / weights.sum()) if weights.sum() > 0 else NAN


def macro_classes(scores, name):
    """How many classes macro_average(scores, name) averages."""
    return int(_macro_members(scores, name).sum())


def confusion_matrix(predictions):
    """(C, C) counts, rows: true class, columns: predicted."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    num_classes = predictions.log_probabilities.shape[1]
    return multiclass_confusion_matrix(predictions.predicted, predictions.labels, num_classes)


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


def _ranked(predictions, c):
    """(float64 ranking scores, bool labels) of class c over the images whose label for it is known."""
    scores = predictions.ranking_scores[:, c]
    if not predictions.multi_label:
        return scores, predictions.labels == c
    known = ~predictions.labels[:, c].isnan()
    return scores[known], predictions.labels[known, c] > 0.5


def _in_unit_interval(scores):
    """Scores mapped, order and ties kept, into [0, 1] (their dense rank over the count of distinct values):
    torchmetrics takes scores outside [0, 1] for logits and applies a sigmoid, which in float64 rounds log-odds
    beyond 37 to 1.0 again. The curves' points depend only on the order."""
    _, rank = torch.unique(scores, return_inverse=True)
    return rank.double() / max(int(rank.max()) if len(rank) else 1, 1)


def roc_curves(predictions):
    """Per class, (false positive rates, true positive rates) of its one-vs-rest ROC curve; None where the
    class has no positive or no negative image."""
    from torchmetrics.functional.classification import binary_roc

    curves = []
    for c in range(predictions.log_probabilities.shape[1]):
        scores, positive = _ranked(predictions, c)
        if 0 < int(positive.sum()) < len(positive):
            fpr, tpr, _ = binary_roc(_in_unit_interval(scores), positive.long())
            curves.append((fpr.tolist(), tpr.tolist()))
        else:
            curves.append(None)
    return curves


def resampled_scores(predictions, counts):
    """The scores of each resample that `counts` describes, computed as the same scores of the images repeated
    that often: macro_f1, macro_auc, ece (arrays of len(counts)) and per class f1, auc ((len(counts), C); NaN
    where a resample lacks what the score needs)."""
    labels = predictions.labels.numpy()
    predicted = predictions.predicted.numpy()
    ranking = predictions.ranking_scores.numpy()
    weights = counts.astype(np.float64)
    num_classes = ranking.shape[1]
    f1, auc = np.full((len(weights), num_classes), NAN), np.full((len(weights), num_classes), NAN)
    # Macro-F1 averages the classes the report's does (present or predicted in the evaluated images) in every
    # resample, a class without images or predictions in it counting 0 (scikit-learn's f1_score with those
    # labels and zero_division=0): letting the resample decide would make a class absent but predicted twice
    # count 0 or drop out by whether those two images were drawn, and the interval of a macro-F1 of 0.49 on
    # 72 images ran to 1.000.
    macro_f1, members = np.zeros(len(weights)), 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for c in range(num_classes):
            positive, chosen = labels == c, predicted == c
            if not (positive.any() or chosen.any()):
                continue
            members += 1
            drawn_positive, drawn_chosen = weights @ positive, weights @ chosen
            twice_true_positive = 2 * (weights @ (positive & chosen))
            macro_f1 += np.where(
                drawn_positive + drawn_chosen > 0, twice_true_positive / (drawn_positive + drawn_chosen), 0
            )
            f1[:, c] = np.where(drawn_positive > 0, twice_true_positive / (drawn_positive + drawn_chosen), NAN)
            if positive.any() and not positive.all():
                auc[:, c] = weighted_auc(ranking[:, c], positive, weights)
        macro_f1 = macro_f1 / members if members else np.full(len(weights), NAN)
    confidence = predictions.probabilities.max(1).values  # what torchmetrics bins, float32 as it
    ece = _weighted_ece(confidence, predicted == labels, weights)
    return {"macro_f1": macro_f1, "macro_auc": _row_mean(auc), "ece": ece, "f1": f1, "auc": auc}


def _row_mean(values):
    """Mean over the finite values of each row; NaN where there is none."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        return np.where(finite, values, 0).sum(1) / finite.sum(1)


def weighted_auc(scores, positive, weights):
    """ROC AUC per row of `weights` (image multiplicities): the weighted share of (positive, negative) pairs
    the scores order right, ties counting half (the Mann-Whitney statistic). NaN for a non-finite score."""
    if not np.isfinite(scores).all():
        return np.full(len(weights), NAN)
    pairs = (weights @ positive) * (weights @ ~positive)
    if positive.sum() * (~positive).sum() <= 1_000_000:
        # Few enough pairs to hold their order (1, 1/2 for a tie, 0) in a matrix: one product per resample,
        # 6x faster than the running sums below at 300 images (0.06 s against 0.37 s for 10,000 resamples).
        above, below = scores[positive][:, None], scores[~positive][None, :]
        ordered = (above > below) + 0.5 * (above == below)
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((weights[:, positive] @ ordered) * weights[:, ~positive]).sum(1) / pairs
    order = np.argsort(scores, kind="stable")
    scores, positive, weights = scores[order], positive[order], weights[:, order]
    # Images with equal scores form a group: a positive beats the negatives of lower groups, ties its own.
    _, group, group_size = np.unique(scores, return_inverse=True, return_counts=True)
    group_end = np.cumsum(group_size) - 1
    negatives_up_to = np.cumsum(weights * ~positive, axis=1)[:, group_end]  # through each group's end
    negatives_below = np.concatenate([np.zeros((len(weights), 1)), negatives_up_to[:, :-1]], axis=1)
    negatives_tied = negatives_up_to - negatives_below
    wins = (weights * positive) * (negatives_below[:, group] + 0.5 * negatives_tied[:, group])
    with np.errstate(invalid="ignore", divide="ignore"):
        return wins.sum(1) / pairs


def _weighted_average_precision(scores, positive, weights):
    """Average precision per row of `weights`: over the distinct scores from the highest down, the recall
    gained at each times the precision of the images scored at least that high (torchmetrics' and
    scikit-learn's step-wise AP, tied images counted together). NaN without positives or for a non-finite score."""
    if not np.isfinite(scores).all():
        return np.full(len(weights), NAN)
    order = np.argsort(-scores, kind="stable")
    scores, positive, weights = scores[order], positive[order], weights[:, order]
    _, group_size = np.unique(-scores, return_counts=True)
    group_end = np.cumsum(group_size) - 1
    positives_up_to = np.cumsum(weights * positive, axis=1)[:, group_end]
    images_up_to = np.cumsum(weights, axis=1)[:, group_end]
    gained = np.diff(positives_up_to, axis=1, prepend=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(images_up_to > 0, positives_up_to / images_up_to, 0)
        return (gained * precision).sum(1) / positives_up_to[:, -1]


def _weighted_ece(confidence, correct, weights, bins=ECE_BINS):
    """Expected calibration error per row of `weights`, binned as torchmetrics bins (a confidence of exactly 1
    in a bin of its own): the sum over bins of |confidence sum - correct count| over the image count."""
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    which = (torch.bucketize(confidence, edges, right=True) - 1).numpy()
    in_bin = np.zeros((len(which), bins + 1))
    in_bin[np.arange(len(which)), which] = 1
    gap = in_bin * (confidence.double().numpy() - correct)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(weights @ gap).sum(1) / weights.sum(1)


def bootstrap_intervals(predictions, resamples=None, seed=BOOTSTRAP_SEED, stratified=False, thresholds=None,
                        confidence=CONFIDENCE):  # fmt: skip
    """Percentile intervals of the scores of `resampled_scores` (multi-label: `resampled_label_scores` at
    `thresholds`): {score: (low, high)}, per-class scores {score: (lows, highs)}; NaN where no resample has the
    score. `resamples`: bootstrap_resamples(images) when None. The resamples (bootstrap_counts) are drawn a
    chunk at a time, so memory stays bounded."""
    labels = predictions.labels.numpy()
    resamples = bootstrap_resamples(len(labels)) if resamples is None else resamples
    groups, count = strata(labels, stratified), len(labels)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // max(count, 1))
    parts = []
    for start in range(0, resamples, chunk):
        counts = draw_counts(rng, groups, min(chunk, resamples - start), count)
        if predictions.multi_label:
            parts.append(resampled_label_scores(predictions, thresholds, counts))
        else:
            parts.append(resampled_scores(predictions, counts))
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for name in parts[0]:
        values = np.concatenate([part[name] for part in parts])
        columns = [percentiles(values[:, c], tail) for c in range(values.shape[1])] if values.ndim == 2 else None
        intervals[name] = tuple(zip(*columns)) if columns else percentiles(values, tail)
    return intervals


def small_set_warning(predictions, thresholds=None, small=SMALL_SET, simulations=200, seed=BOOTSTRAP_SEED):
    """One line when fewer than `small` images were evaluated, with what that size costs: the width of the
    accuracy (multi-label: exact-match) interval and, single-label, the ECE a perfectly calibrated model with
    these confidences would show on average (each image right with the probability it states; `simulations`
    such sets): the floor under which an ECE says nothing. Multi-label at `thresholds` (DEFAULT_THRESHOLD when
    not given). None from `small` images on. The report's rows carry it (report_text shows it)."""
    count = len(predictions)
    if count >= small or count == 0:
        return None
    if predictions.multi_label:
        thresholds = thresholds or [DEFAULT_THRESHOLD] * predictions.labels.shape[1]
        name, right = "exact match", _exact_matches(predictions, thresholds)
    else:
        name, right = "accuracy", int((predictions.predicted == predictions.labels).sum())
    low, high, _ = proportion_interval(right, count)
    line = f"only {count} images: {name}'s 95% interval is {high - low:.3f} wide"
    if not predictions.multi_label:
        confidence = predictions.probabilities.max(1).values
        rng = np.random.default_rng(seed)
        simulated = rng.random((simulations, count)) < confidence.double().numpy()
        ones = np.ones((1, count))
        floor = np.mean([_weighted_ece(confidence, right_ones, ones)[0] for right_ones in simulated])
        line += f" and a perfectly calibrated model's ECE would average {floor:.3f} here"
    return line + f"; below {small} images read these figures as rough"


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


def _exact_matches(predictions, thresholds):
    """How many images have every known label right."""
    known = ~predictions.labels.isnan()
    agree = (predicted_sets(predictions, thresholds) == (predictions.labels > 0.5)) | ~known
    return int(agree.all(1).sum())


def label_scores(predictions, thresholds):
    """Per class: support (positive images), negatives, tp/fp/fn, precision, recall and F1 at its threshold,
    average precision and ROC AUC (ranked by the logits in float64), and the threshold. Precision is 0 for a
    class never predicted; AP is NaN without positives, AUC without both positives and negatives."""
    keys = ("support", "negatives", "tp", "fp", "fn", "precision", "recall", "f1", "ap", "auc")
    scores = {key: [] for key in keys}
    for c, threshold in enumerate(thresholds):
        probabilities, positive = _known(predictions, c)
        ranking, _ = _ranked(predictions, c)
        predicted = probabilities >= threshold
        tp, fp, fn = (int(x.sum()) for x in (predicted & positive, predicted & ~positive, ~predicted & positive))
        support = int(positive.sum())
        for key, value in (("support", support), ("negatives", len(positive) - support), ("tp", tp), ("fp", fp),
                           ("fn", fn)):  # fmt: skip
            scores[key].append(value)
        scores["precision"].append(tp / (tp + fp) if tp + fp else 0.0)
        scores["recall"].append(tp / support if support else NAN)
        scores["f1"].append(2 * tp / (2 * tp + fp + fn) if support else NAN)
        ranking, positive, unit = ranking.numpy(), positive.numpy(), np.ones((1, len(positive)))
        scores["ap"].append(float(_weighted_average_precision(ranking, positive, unit)[0]) if support else NAN)
        defined = 0 < support < len(positive)
        scores["auc"].append(float(weighted_auc(ranking, positive, unit)[0]) if defined else NAN)
    scores["threshold"] = list(thresholds)
    return scores


def label_summary(predictions, scores):
    """mAP, macro AUC and macro F1 (means over the classes where they are defined), micro F1 (from the counts
    of all classes together) and exact-match accuracy (every known label of an image right)."""
    tp, fp, fn = (sum(scores[key]) for key in ("tp", "fp", "fn"))
    count = len(predictions)
    return {
        "map": _defined_mean(scores["ap"]),
        "macro auc": _defined_mean(scores["auc"]),
        "micro f1": 2 * tp / (2 * tp + fp + fn) if tp + fn else NAN,
        "macro f1": _defined_mean(scores["f1"]),
        "exact match": _exact_matches(predictions, scores["threshold"]) / count if count else NAN,
    }


def resampled_label_scores(predictions, thresholds, counts):
    """Multi-label `resampled_scores`: map, macro_auc, macro_f1, micro_f1 (arrays of len(counts)) and per
    class ap, auc, f1 ((len(counts), C)) of each resample, at `thresholds`."""
    labels = predictions.labels.numpy()
    chosen_all = predicted_sets(predictions, thresholds).numpy()
    ranking_all = predictions.ranking_scores.numpy()
    weights_all = counts.astype(np.float64)
    shape = (len(counts), labels.shape[1])
    ap, auc, f1 = np.full(shape, NAN), np.full(shape, NAN), np.full(shape, NAN)
    total = {"tp": 0, "fp": 0, "fn": 0}
    with np.errstate(invalid="ignore", divide="ignore"):
        for c in range(labels.shape[1]):
            known = ~np.isnan(labels[:, c])
            weights, positive, chosen = weights_all[:, known], labels[known, c] > 0.5, chosen_all[known, c]
            tp, fp, fn = (weights @ (chosen & positive), weights @ (chosen & ~positive), weights @ (~chosen & positive))
            total["tp"], total["fp"], total["fn"] = total["tp"] + tp, total["fp"] + fp, total["fn"] + fn
            support = weights @ positive
            f1[:, c] = np.where(support > 0, 2 * tp / (2 * tp + fp + fn), NAN)
            if positive.any():
                ap[:, c] = _weighted_average_precision(ranking_all[known, c], positive, weights)
                if not positive.all():
                    auc[:, c] = weighted_auc(ranking_all[known, c], positive, weights)
        tp, fp, fn = total["tp"], total["fp"], total["fn"]
        micro_f1 = np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), NAN)
    return {"map": _row_mean(ap), "macro_auc": _row_mean(auc), "macro_f1": _row_mean(f1), "micro_f1": micro_f1,
            "ap": ap, "auc": auc, "f1": f1}  # fmt: skip


def _defined_mean(values):
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else NAN


def pr_curves(predictions):
    """Per class, (recall, precision) of its precision-recall curve; None where it has no positive image."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    curves = []
    for c in range(predictions.labels.shape[1]):
        scores, positive = _ranked(predictions, c)
        if positive.any():
            precision, recall, _ = binary_precision_recall_curve(_in_unit_interval(scores), positive.long())
            curves.append((recall.tolist(), precision.tolist()))
        else:
            curves.append(None)
    return curves


def _ranking_trials(scores, classes):
    """The trials an AUC or AP of `classes` rests on: the smallest min(positives, negatives) among them."""
    return min((min(scores["support"][c], scores["negatives"][c]) for c in classes), default=0)


def label_report(predictions, class_names, thresholds, resamples=None, seed=BOOTSTRAP_SEED,
                 stratified=False):  # fmt: skip
    """The multi-label report's rows (LABEL_REPORT_COLUMNS): one per class with its intervals (precision and
    recall: proportion_interval; F1, AP and AUC: bootstrap), the macro average, then one per summary score
    (label_summary) with its interval (exact match: a proportion; the others: bootstrap)."""
    scores = label_scores(predictions, thresholds)
    intervals = bootstrap_intervals(predictions, resamples, seed, stratified, thresholds)
    columns = ("support", "precision", "recall", "f1", "ap", "auc", "threshold")
    rows = []
    for c, name in enumerate(class_names):
        row = {"label": name, **{key: scores[key][c] for key in columns}}
        tp, fp = scores["tp"][c], scores["fp"][c]
        row["precision_low"], row["precision_high"], _ = proportion_interval(tp, tp + fp)
        row["recall_low"], row["recall_high"], _ = proportion_interval(tp, scores["support"][c])
        trials = {"f1": scores["support"][c], "ap": _ranking_trials(scores, [c]), "auc": _ranking_trials(scores, [c])}
        for key, trial_count in trials.items():
            bootstrap = (intervals[key][0][c], intervals[key][1][c])
            row[f"{key}_low"], row[f"{key}_high"], _ = score_interval(row[key], bootstrap, trial_count)
        rows.append(row)
    present = [row for row in rows if row["support"] > 0]
    averages = {key: _defined_mean([row[key] for row in present]) for key in ("precision", "recall", "f1", "ap", "auc")}
    rows.append({"label": "macro avg", "support": sum(scores["support"]), "classes": len(present), **averages})
    count = len(predictions)
    defined = {key: [c for c, v in enumerate(scores[key]) if np.isfinite(v)] for key in ("ap", "auc", "f1")}
    for label, value in label_summary(predictions, scores).items():
        row = {"label": label, "support": count, "value": value}
        if label == "exact match":
            interval = proportion_interval(_exact_matches(predictions, thresholds), count)
        else:
            key = {"map": "map", "macro auc": "macro_auc", "micro f1": "micro_f1", "macro f1": "macro_f1"}[label]
            classes = {"map": defined["ap"], "macro auc": defined["auc"], "macro f1": defined["f1"]}.get(label)
            if classes is None:
                trials = sum(scores["support"])
            elif label == "macro f1":
                trials = min((scores["support"][c] for c in classes), default=0)
            else:
                trials = _ranking_trials(scores, classes)
            if classes is not None:
                row["classes"] = len(classes)
            interval = score_interval(value, intervals[key], trials)
        row["ci_low"], row["ci_high"], row["ci_method"] = interval
        rows.append(row)
    rows[-1]["warning"] = small_set_warning(predictions, thresholds=thresholds)  # on exact match's row
    return rows


def label_report_text(title, loss, rows, class_names):
    """The console report of a multi-label model: per-class scores, their average, the summary line with the
    intervals and, below SMALL_SET images, the small-set warning."""
    columns = ("precision", "recall", "f1", "ap", "auc", "threshold")
    table_rows = [row for row in rows if row["label"] in (*class_names, "macro avg")]
    width = max(12, *(display_width(row["label"]) for row in table_rows))
    images = next(row["support"] for row in rows if row["label"] == "map")
    lines = [f"\n{title}: {images} images, loss {loss:.3f}"]
    lines.append(f"{'':>{width}}  " + "  ".join(f"{c:>9}" for c in columns) + f"  {'support':>7}")
    for row in table_rows:
        cells = [f"{row[c]:9.3f}" if np.isfinite(row.get(c, np.nan)) else f"{'-':>9}" for c in columns]
        lines.append(f"{pad(row['label'], width)}  {'  '.join(cells)}  {row['support']:>7}")
    macro = next(row for row in table_rows if row["label"] == "macro avg")
    if macro["classes"] != len(class_names):
        lines.append(f"macro avg over the {macro['classes']} of {len(class_names)} classes with positive images")
    summary = [row for row in rows if "value" in row]
    names = {"map": "mAP", "macro auc": "macro AUC", "micro f1": "micro-F1", "macro f1": "macro-F1",
             "exact match": "exact match"}  # fmt: skip
    lines.append(", ".join(with_interval(row, names[row["label"]]) for row in summary))
    lines += _warning_lines(rows)
    return "\n".join(lines)


def with_interval(row, name):
    """'name 0.912 (0.884-0.937)'; without an interval 'name 0.912', an undefined score 'name n/a'."""
    value, low, high = row.get("value"), row.get("ci_low"), row.get("ci_high")
    if value is None or not np.isfinite(value):
        return f"{name} n/a"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{name} {value:.3f}"
    return f"{name} {value:.3f} ({low:.3f}-{high:.3f})"


def _warning_lines(rows):
    """The small-set warning the report's rows carry (key "warning", not a report.csv column), as lines."""
    return [f"warning: {row['warning']}" for row in rows if row.get("warning")]


# ---------------------------------------------------------------------------------------------- report


def report(predictions, class_names, resamples=None, seed=BOOTSTRAP_SEED, stratified=False):
    """Everything the final report states: rows of report.csv (REPORT_COLUMNS) and the confusion matrix.

    Rows: one per class, with the intervals of its precision, recall and specificity (proportion_interval)
    and of its F1 and AUC (bootstrap, score_interval); the macro and weighted averages, with the number of
    classes they average (`classes`); then one per summary score, `value` with `ci_low`-`ci_high` and
    `ci_method`: accuracy and top-k (proportions), macro-F1, macro AUC and ECE (bootstrap)."""
    scores = class_scores(predictions)
    intervals = bootstrap_intervals(predictions, resamples, seed, stratified)
    count = len(predictions)
    per_class = ("precision", "recall", "specificity", "f1", "auc")
    negatives = [count - s for s in scores["support"]]
    rows = []
    for c, name in enumerate(class_names):
        row = {"label": name, "support": scores["support"][c], **{key: scores[key][c] for key in per_class}}
        tp = scores["tp"][c]
        for key, trials in (("precision", scores["predicted"][c]), ("recall", scores["support"][c])):
            row[f"{key}_low"], row[f"{key}_high"], _ = proportion_interval(tp, trials)
        row["specificity_low"], row["specificity_high"], _ = proportion_interval(scores["tn"][c], negatives[c])
        trials = {"f1": scores["support"][c], "auc": min(scores["support"][c], negatives[c])}
        for key, trial_count in trials.items():
            bootstrap = (intervals[key][0][c], intervals[key][1][c])
            row[f"{key}_low"], row[f"{key}_high"], _ = score_interval(row[key], bootstrap, trial_count)
        rows.append(row)
    rows.append({"label": "macro avg", "support": count, "classes": macro_classes(scores, "f1"),
                 **{key: macro_average(scores, key) for key in per_class}})  # fmt: skip
    present = sum(s > 0 for s in scores["support"])
    rows.append({"label": "weighted avg", "support": count, "classes": present,
                 **{key: macro_average(scores, key, weighted=True) for key in per_class}})  # fmt: skip

    in_f1 = np.flatnonzero(_macro_members(scores, "f1"))
    in_auc = np.flatnonzero(_macro_members(scores, "auc"))
    correct = int((predictions.predicted == predictions.labels).sum())
    macro_f1, macro_auc = macro_average(scores, "f1"), macro_average(scores, "auc")
    f1_trials = min((scores["support"][c] for c in in_f1), default=0)
    auc_trials = min((min(scores["support"][c], negatives[c]) for c in in_auc), default=0)
    ece = expected_calibration_error(predictions)
    summary = [
        ("accuracy", correct / max(count, 1), proportion_interval(correct, count), None),
        ("macro f1", macro_f1, score_interval(macro_f1, intervals["macro_f1"], f1_trials), len(in_f1)),
        ("macro auc", macro_auc, score_interval(macro_auc, intervals["macro_auc"], auc_trials), len(in_auc)),
        ("ece", ece, score_interval(ece, intervals["ece"], count), None),
    ]
    for k in (2, 5):
        if k < len(class_names):
            value = topk_accuracy(predictions, k)
            summary.append((f"top{k} accuracy", value, proportion_interval(round(value * count), count), None))
    for label, value, (low, high, method), classes in summary:
        row = {"label": label, "support": count, "value": value, "ci_low": low, "ci_high": high, "ci_method": method}
        if classes is not None:
            row["classes"] = classes
        rows.append(row)
    next(row for row in rows if row["label"] == "accuracy")["warning"] = small_set_warning(predictions)
    return rows, confusion_matrix(predictions)


def summary_line(rows):
    """'accuracy 0.912 (95% CI 0.884-0.937), macro-F1 ..., macro AUC 0.981 (0.972-0.988), ECE 0.031 (...)'."""
    summary = {row["label"]: row for row in rows}
    parts = [with_interval(summary["accuracy"], "accuracy").replace(" (", " (95% CI ", 1)]
    parts += [with_interval(summary["macro f1"], "macro-F1"), with_interval(summary["macro auc"], "macro AUC")]
    return ", ".join(parts) + ", " + with_interval(summary["ece"], "ECE")


def display_width(text):
    """Columns `text` takes in a terminal: wide (CJK) characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in str(text)
    )


def pad(text, width):
    """Right-align `text` in `width` terminal columns."""
    return " " * max(0, width - display_width(text)) + str(text)


def report_text(title, loss, rows, confusion, class_names):
    """The console report: per-class scores ('-' where undefined), averages (with the number of classes the
    macro one averages when not all), the summary line with the intervals, the confusion matrix and, below
    SMALL_SET images, the small-set warning."""
    columns = ("precision", "recall", "specificity", "f1", "auc")
    table_rows = [row for row in rows if row["label"] in (*class_names, "macro avg", "weighted avg")]
    width = max(12, *(display_width(row["label"]) for row in table_rows))
    count = int(confusion.sum())
    lines = [f"\n{title}: {count} images, loss {loss:.3f}"]
    lines.append(f"{'':>{width}}  " + "  ".join(f"{c:>11}" for c in columns) + f"  {'support':>7}")
    for row in table_rows:
        cells = [f"{row[c]:11.3f}" if np.isfinite(row[c]) else f"{'-':>11}" for c in columns]
        lines.append(f"{pad(row['label'], width)}  {'  '.join(cells)}  {row['support']:>7}")
    macro = next((row for row in table_rows if row["label"] == "macro avg"), {})
    if macro.get("classes", len(class_names)) != len(class_names):
        lines.append(f"macro avg over {macro['classes']} of {len(class_names)} classes (present or predicted)")
    lines.append(summary_line(rows))
    topk = [row for row in rows if row["label"].startswith("top")]
    if topk:
        lines[-1] += "; " + ", ".join(with_interval(row, row["label"]) for row in topk)
    cell = max(5, *(display_width(name) for name in class_names))
    lines.append(f"\nconfusion matrix (rows: true, columns: predicted)\n{'':>{width}}  "
                 + "  ".join(pad(n, cell) for n in class_names))  # fmt: skip
    for name, counts in zip(class_names, confusion.tolist()):
        lines.append(f"{pad(name, width)}  " + "  ".join(f"{c:>{cell}}" for c in counts))
    lines += _warning_lines(rows)
    return "\n".join(lines)
