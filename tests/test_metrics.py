"""The numbers of a report, each against a value computed another way: by hand from a tiny probability table,
by counting pairs, or by writing the bootstrap's resamples out."""

import math

import numpy as np
import pytest
import torch

import metrics
from intervals import bootstrap_counts


def predictions_of(probabilities, labels):
    probabilities = torch.tensor(probabilities, dtype=torch.float64)
    probabilities = probabilities / probabilities.sum(1, keepdim=True)
    return metrics.Predictions(torch.arange(len(labels)), torch.tensor(labels), probabilities.log().float())


# Six images, three classes. Predicted: 0, 1, 1, 2, 2, 0 -> right: images 0, 2, 3 (accuracy 1/2).
TABLE = [
    [0.7, 0.2, 0.1],
    [0.3, 0.6, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.2, 0.6],
    [0.1, 0.3, 0.6],
    [0.5, 0.1, 0.4],
]
TABLE_LABELS = [0, 0, 1, 2, 1, 2]


def pair_count_auc(scores, positive):
    """ROC AUC as the share of (positive, negative) pairs ordered right, ties counting half."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_one_vs_rest_auc_equals_the_share_of_pairs_ordered_right():
    scores = metrics.class_scores(predictions_of(TABLE, TABLE_LABELS))
    for c in range(3):
        column = [row[c] / sum(row) for row in TABLE]
        expected = pair_count_auc(column, [label == c for label in TABLE_LABELS])
        assert scores["auc"][c] == pytest.approx(expected, abs=1e-6)
    # by hand for class 0: positives 0.7, 0.3; negatives 0.1, 0.2, 0.1, 0.5 -> (4 + 3) / 8
    assert scores["auc"][0] == pytest.approx(7 / 8, abs=1e-6)


def test_auc_counts_tied_scores_as_half():
    # class 1's scores: positives 0.9, 0.4; negatives 0.4, 0.3 -> (2 + 0.5 + 1) / 4
    predictions = predictions_of([[0.1, 0.9], [0.6, 0.4], [0.6, 0.4], [0.7, 0.3]], [1, 1, 0, 0])
    assert metrics.class_scores(predictions)["auc"][1] == pytest.approx(3.5 / 4, abs=1e-6)


def test_specificity_precision_recall_from_counts():
    scores = metrics.class_scores(predictions_of(TABLE, TABLE_LABELS))
    predicted = [max(range(3), key=row.__getitem__) for row in TABLE]
    for c in range(3):
        tp = sum(p == c and t == c for p, t in zip(predicted, TABLE_LABELS))
        fp = sum(p == c and t != c for p, t in zip(predicted, TABLE_LABELS))
        tn = sum(p != c and t != c for p, t in zip(predicted, TABLE_LABELS))
        fn = sum(p != c and t == c for p, t in zip(predicted, TABLE_LABELS))
        assert scores["specificity"][c] == pytest.approx(tn / (tn + fp))
        assert scores["precision"][c] == pytest.approx(tp / (tp + fp))
        assert scores["recall"][c] == pytest.approx(tp / (tp + fn))
        assert scores["f1"][c] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # class 0: predicted for images 0 and 5 (5 is class 2); not predicted for image 1 -> tn 3 of 4 negatives
    assert scores["specificity"][0] == pytest.approx(3 / 4)


def test_a_class_without_positives_or_negatives_has_no_auc():
    # class 2 never occurs; class 0 and 1 do
    predictions = predictions_of([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1]], [0, 1, 1])
    scores = metrics.class_scores(predictions)
    assert math.isnan(scores["auc"][2]) and not math.isnan(scores["auc"][0])
    assert metrics.macro_average(scores, "auc") == pytest.approx((scores["auc"][0] + scores["auc"][1]) / 2)
    only_one_class = metrics.class_scores(predictions_of([[0.8, 0.2], [0.4, 0.6]], [0, 0]))
    assert all(math.isnan(auc) for auc in only_one_class["auc"])
    assert math.isnan(only_one_class["specificity"][0])  # class 0 has no negative image


def test_expected_calibration_error_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.55 (wrong), in the 15 bins [0.867, 0.933),
    # [0.6, 0.667) and [0.533, 0.6): |0.5 - 0.9| * 2/4 + |1 - 0.62| * 1/4 + |0 - 0.55| * 1/4
    predictions = predictions_of([[0.9, 0.1], [0.1, 0.9], [0.62, 0.38], [0.45, 0.55]], [0, 0, 0, 0])
    expected = 0.4 * 2 / 4 + 0.38 / 4 + 0.55 / 4
    assert metrics.expected_calibration_error(predictions) == pytest.approx(expected, abs=1e-5)
    bins = metrics.calibration_bins(predictions)
    assert sum(bins["count"]) == 4
    from_bins = sum(n / 4 * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n)
    assert from_bins == pytest.approx(expected, abs=1e-5)


def random_predictions(count=120, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    logits = torch.randn(count, classes, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, classes)
    return metrics.Predictions(torch.arange(count), labels, logits.log_softmax(1))


def test_stratified_bootstrap_resamples_keep_every_class_count():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    counts = bootstrap_counts(labels, resamples=50, seed=3, stratified=True)
    for c in range(3):
        assert (counts[:, labels == c].sum(1) == (labels == c).sum()).all()
    assert len({tuple(row) for row in counts}) > 40  # the resamples differ
    assert (bootstrap_counts(labels, 50, 3, stratified=True) == counts).all()  # seeded


def test_the_bootstrap_draws_images_regardless_of_class_by_default():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    counts = bootstrap_counts(labels, resamples=200, seed=3)
    assert (counts.sum(1) == len(labels)).all()
    assert len(set(counts[:, labels == 1].sum(1).tolist())) > 2  # class 1's count varies from resample to resample
    assert (bootstrap_counts(labels, 200, 3) == counts).all()  # seeded


def test_bootstrap_interval_equals_the_percentiles_of_the_resamples_written_out():
    from torchmetrics.functional.classification import binary_auroc, multiclass_f1_score

    predictions = random_predictions()
    intervals = metrics.bootstrap_intervals(predictions, resamples=200, seed=5)
    counts = bootstrap_counts(predictions.labels.numpy(), 200, 5)
    by_resample = {"macro_f1": [], "macro_auc": [], "ece": [], "f1": [], "auc": []}
    for row in counts:
        drawn = torch.from_numpy(np.repeat(np.arange(len(row)), row))
        resample = metrics.Predictions(drawn, predictions.labels[drawn], predictions.log_probabilities[drawn])
        scores = metrics.epoch_scores(resample)  # torchmetrics on the written-out resample
        by_resample["macro_f1"].append(scores["val_macro_f1"])
        by_resample["macro_auc"].append(scores["val_auc"])
        by_resample["ece"].append(metrics.expected_calibration_error(resample))
        labels, probabilities = resample.labels, resample.probabilities
        by_resample["f1"].append(multiclass_f1_score(probabilities, labels, 3, average=None)[0].item())
        by_resample["auc"].append(binary_auroc(probabilities[:, 0], (labels == 0).long()).item())
    for name, values in by_resample.items():
        expected = tuple(np.percentile(values, [2.5, 97.5]))
        interval = intervals[name] if name.startswith(("macro", "ece")) else tuple(end[0] for end in intervals[name])
        assert interval == pytest.approx(expected, abs=1e-6), name


def test_accuracy_interval_is_as_wide_as_the_binomial_one():
    # 400 images, 320 right: the normal approximation gives 0.8 +- 1.96 * sqrt(0.8 * 0.2 / 400) = +- 0.039
    labels = [i % 2 for i in range(400)]
    right = [i % 5 != 0 for i in range(400)]
    table = [[0.8, 0.2] if (label == 0) == ok else [0.2, 0.8] for label, ok in zip(labels, right)]
    rows, _ = metrics.report(predictions_of(table, labels), ["a", "b"])
    accuracy = next(row for row in rows if row["label"] == "accuracy")
    low, high = accuracy["ci_low"], accuracy["ci_high"]
    assert low < 0.8 < high and accuracy["ci_method"] == "wilson"
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.8 * 0.2 / 400), rel=0.05)


def test_per_class_and_macro_scores_equal_scikit_learn():
    from sklearn import metrics as sk

    predictions = random_predictions(count=150, classes=4, seed=2)
    labels, predicted = predictions.labels.numpy(), predictions.predicted.numpy()
    scores = metrics.class_scores(predictions)
    precision, recall, f1, support = sk.precision_recall_fscore_support(labels, predicted, zero_division=0)
    assert scores["precision"] == pytest.approx(precision.tolist())
    assert scores["recall"] == pytest.approx(recall.tolist()) and scores["f1"] == pytest.approx(f1.tolist())
    assert scores["support"] == support.tolist()
    assert metrics.macro_average(scores, "f1") == pytest.approx(sk.f1_score(labels, predicted, average="macro"))
    probabilities = predictions.probabilities.double().numpy()
    for c in range(4):
        assert scores["auc"][c] == pytest.approx(sk.roc_auc_score(labels == c, probabilities[:, c]), abs=1e-9)


def test_report_rows_and_summary_line():
    rows, confusion = metrics.report(predictions_of(TABLE, TABLE_LABELS), ["a", "b", "c"])
    by_label = {row["label"]: row for row in rows}
    assert by_label["accuracy"]["value"] == pytest.approx(0.5)
    assert by_label["accuracy"]["ci_low"] <= 0.5 <= by_label["accuracy"]["ci_high"]
    assert by_label["macro auc"]["value"] == pytest.approx(by_label["macro avg"]["auc"])
    assert by_label["b"]["support"] == 2 and int(confusion.sum()) == 6
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    line = metrics.summary_line(rows)
    assert line.startswith("accuracy 0.500 (95% CI ") and "macro AUC" in line and "ECE" in line


def test_validation_loss_is_the_mean_negative_log_probability_and_a_nan_stays_nan():
    expected = -sum(math.log(row[label] / sum(row)) for row, label in zip(TABLE, TABLE_LABELS)) / len(TABLE)
    assert metrics.mean_loss(predictions_of(TABLE, TABLE_LABELS)) == pytest.approx(expected, rel=1e-6)
    certain = metrics.Predictions(torch.arange(1), torch.tensor([0]), torch.tensor([[1e-9, -30.0]]))
    assert metrics.mean_loss(certain) == 0.0  # a log-probability rounded above 0 is no negative loss
    # A model that outputs NaN (diverged, or a broken kernel) must show it, not a perfect 0.000.
    broken = metrics.Predictions(torch.arange(2), torch.tensor([0, 1]), torch.full((2, 2), float("nan")))
    assert math.isnan(metrics.epoch_scores(broken)["val_loss"])
