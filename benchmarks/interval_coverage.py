"""How often the report's 95% intervals hold the true value, by simulation: many evaluated sets drawn from a
known model, each given its interval by the functions report() uses (proportion_interval,
metrics.bootstrap_intervals and score_interval), and the share of intervals that contain the truth.
Also the ECE a perfectly calibrated model shows by set size (the floor behind metrics.SMALL_SET), and with
--repeat how far the bootstrap's ends move under other seeds on 300 images.

    python benchmarks/interval_coverage.py             # the coverage table (about a minute on 2 cores)
    python benchmarks/interval_coverage.py --sets 200 --resamples 2000   # quicker, noisier
    python benchmarks/interval_coverage.py --repeat    # the ends under 11 seeds, and report()'s time
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metrics  # noqa: E402
from intervals import bootstrap_counts, proportion_interval, score_interval


def binary_predictions(positive, scores):
    """Two-class Predictions whose class-1 log-odds are `scores` (float64)."""
    logits = torch.stack([torch.zeros(len(scores), dtype=torch.float64), torch.as_tensor(scores)], 1)
    labels = torch.as_tensor(positive, dtype=torch.long)
    return metrics.Predictions(torch.arange(len(labels)), labels, logits.log_softmax(1))


def class_predictions(labels, predicted, classes):
    """Predictions that predict `predicted` (log-probabilities with that class on top)."""
    logits = 3.0 * torch.nn.functional.one_hot(torch.as_tensor(predicted), classes).double()
    return metrics.Predictions(torch.arange(len(labels)), torch.as_tensor(labels), logits.log_softmax(1))


def accuracy_coverage(true, n, sets, rng):
    """(exact coverage, simulated coverage, the old stratified percentile bootstrap's simulated coverage)."""
    intervals = [proportion_interval(x, n)[:2] for x in range(n + 1)]
    covered = np.array([low <= true <= high for low, high in intervals])
    exact = float(stats.binom.pmf(np.arange(n + 1), n, true) @ covered)
    counts = rng.binomial(n, true, sets)
    old = []
    for _ in range(min(sets, 300)):  # the percentile bootstrap this replaced: stratified by class, 1,000 resamples
        labels = rng.integers(0, 2, n)
        correct = rng.random(n) < true
        weights = bootstrap_counts(labels, 1000, int(rng.integers(1 << 31)), stratified=True)
        low, high = np.percentile(weights @ correct / n, [2.5, 97.5])
        old.append(low <= true <= high)
    return exact, float(covered[counts].mean()), float(np.mean(old))


def auc_coverage(true_auc, n, sets, resamples, rng, prevalence=0.5):
    """Coverage of macro AUC's interval for binormal scores (positives N(d, 1), negatives N(0, 1)), and the
    share of sets whose interval came from the collapsed-bootstrap bound."""
    shift = np.sqrt(2) * stats.norm.ppf(true_auc)
    hits, bound = [], []
    for _ in range(sets):
        positive = rng.random(n) < prevalence
        if positive.all() or not positive.any():
            continue
        scores = rng.normal(0, 1, n) + shift * positive
        predictions = binary_predictions(positive, scores)
        value = metrics.class_scores(predictions)["auc"][1]
        bootstrap = metrics.bootstrap_intervals(predictions, resamples, int(rng.integers(1 << 31)))["macro_auc"]
        low, high, method = score_interval(value, bootstrap, int(min(positive.sum(), (~positive).sum())))
        hits.append(low <= true_auc <= high)
        bound.append(method != "bootstrap")
    return float(np.mean(hits)), float(np.mean(bound))


def macro_f1_coverage(n, sets, resamples, rng):
    """Coverage of macro-F1's interval with classes of 45%, 45% and 10%, each predicted right 85% of the time
    (errors spread evenly): the true macro-F1 is that of the population's confusion matrix."""
    priors = np.array([0.45, 0.45, 0.10])
    confusion = np.full((3, 3), 0.075) + np.eye(3) * (0.85 - 0.075)  # P(predicted | true)
    joint = priors[:, None] * confusion
    true_f1 = np.mean(2 * np.diag(joint) / (joint.sum(1) + joint.sum(0)))
    hits = []
    for _ in range(sets):
        labels = rng.choice(3, n, p=priors)
        predicted = np.array([rng.choice(3, p=confusion[t]) for t in labels])
        predictions = class_predictions(labels, predicted, 3)
        scores = metrics.class_scores(predictions)
        value = metrics.macro_average(scores, "f1")
        bootstrap = metrics.bootstrap_intervals(predictions, resamples, int(rng.integers(1 << 31)))["macro_f1"]
        trials = min(s for s in scores["support"] if s > 0)
        low, high, _ = score_interval(value, bootstrap, trials)
        hits.append(low <= true_f1 <= high)
    return float(np.mean(hits)), float(true_f1)


def calibrated_ece(n, sets, rng, classes=3):
    """Mean ECE of a perfectly calibrated model on n images: confidences from Dirichlet-distributed
    probabilities, each image right with the probability of its predicted class."""
    values = []
    for _ in range(sets):
        probabilities = rng.dirichlet(np.full(classes, 0.3), n)
        predicted = probabilities.argmax(1)
        right = rng.random(n) < probabilities.max(1)
        labels = np.where(right, predicted, (predicted + 1 + rng.integers(0, classes - 1, n)) % classes)
        log_p = torch.from_numpy(np.log(probabilities)).float()
        predictions = metrics.Predictions(torch.arange(n), torch.from_numpy(labels), log_p)
        values.append(metrics.expected_calibration_error(predictions))
    return float(np.mean(values))


def repeatability(seeds=11):
    torch.set_num_threads(1)
    for separation in (1.5, 3.0):
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 3, (300,), generator=generator)
        logits = torch.randn(300, 3, generator=generator) + separation * torch.nn.functional.one_hot(labels, 3)
        predictions = metrics.Predictions(torch.arange(300), labels, logits.log_softmax(1))
        metrics.report(predictions, list("abc"))  # imports
        start = time.perf_counter()
        metrics.report(predictions, list("abc"))
        seconds = time.perf_counter() - start
        ends = []
        for seed in range(seeds):
            intervals = metrics.bootstrap_intervals(predictions, seed=seed)
            ends.append([*intervals["macro_f1"], *intervals["macro_auc"], *intervals["ece"]])
        ends = np.array(ends)
        print(
            f"300 images, accuracy {metrics.accuracy(predictions):.3f}: report() {seconds:.2f} s; standard "
            f"deviation of the macro-F1, macro AUC, ECE ends over {seeds} seeds {np.round(ends.std(0, ddof=1), 4)}, "
            f"largest move from seed 0 {np.abs(ends[1:] - ends[0]).max():.4f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=400, help="simulated sets per bootstrap case")
    parser.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default: the report's)")
    parser.add_argument("--repeat", action="store_true", help="the bootstrap ends under other seeds instead")
    args = parser.parse_args()
    if args.repeat:
        return repeatability()
    rng = np.random.default_rng(0)
    print("| case | interval | coverage (nominal 0.95) |\n|---|---|---|")
    for n in (20, 30, 50):
        exact, simulated, old = accuracy_coverage(0.95, n, 4000, rng)
        print(
            f"| accuracy 0.95, n = {n} | Wilson | {exact:.3f} exact, {simulated:.3f} in 4,000 sets "
            f"(the old percentile bootstrap: {old:.2f}) |"
        )
    exact, simulated, _ = accuracy_coverage(0.99, 10, 4000, rng)
    print(
        f"| accuracy 0.99, n = 10 (90% of sets are 10 of 10) | Clopper-Pearson at 10 of 10 (0.69-1), modified Wilson "
        f"at 9 of 10 | {exact:.3f} exact |"
    )
    for n in (60, 200):
        coverage, _ = auc_coverage(0.85, n, args.sets, args.resamples, rng)
        print(f"| AUC 0.85, n = {n} (binormal) | bootstrap | {coverage:.3f} in {args.sets} sets |")
    coverage, true_f1 = macro_f1_coverage(200, args.sets, args.resamples, rng)
    print(
        f"| macro-F1 {true_f1:.3f}, 3 classes, one of 10%, n = 200 | bootstrap | {coverage:.3f} in {args.sets} sets |"
    )
    for n in (20, 40):
        coverage, bound = auc_coverage(0.99, n, args.sets, args.resamples, rng)
        print(
            f"| AUC 0.99, n = {n} ({bound:.0%} of sets perfect) | Clopper-Pearson of min(pos, neg) trials "
            f"where perfect, bootstrap otherwise | {coverage:.3f} in {args.sets} sets |"
        )
    print("\nECE of a perfectly calibrated model (3 classes), mean over 300 sets:")
    for n in (50, 100, 150, 200, 250, 300, 600):
        print(f"  n = {n}: {calibrated_ece(n, 300, rng):.3f}")


if __name__ == "__main__":
    main()
