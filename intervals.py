"""The 95% interval methods behind every figure of metrics.py: the proportion intervals (Wilson, its modified
form near 0 and n, Clopper-Pearson at 0 and n), the fallback for a score whose bootstrap collapses, and the
bootstrap's resampling counts. Numbers in, numbers out: what is resampled and scored is metrics.py's.
"""

import math

import numpy as np

NAN = float("nan")


CONFIDENCE = 0.95


# Resamples of the bootstrap. The Monte Carlo error of a percentile end falls as 1/sqrt(resamples) and, as the
# bootstrap's spread falls as 1/sqrt(images), stays the same where images x resamples does. Measured on 300
# images, 3 classes, 11 seeds: at 10,000 resamples the ends of macro-F1, macro AUC and ECE have a standard
# deviation of at most 0.0008 (accuracy 0.78) and 0.0003 (accuracy 0.96), 0.0006 / 0.0002 at 20,000, and
# report() takes 0.12 s (0.3 s on a busy machine; about twice that at 20,000). So 10,000 resamples up to 300
# images, fewer above, to keep images x resamples at BOOTSTRAP_DRAWS (and the time about constant), never
# fewer than 1,000.
BOOTSTRAP_RESAMPLES = 10_000


BOOTSTRAP_DRAWS = 3_000_000


BOOTSTRAP_MIN_RESAMPLES = 1_000


BOOTSTRAP_SEED = 0


def proportion_interval(successes, n, confidence=CONFIDENCE):
    """(low, high, method) of a proportion `successes`/`n`, as Brown, Cai & DasGupta 2001 ("Interval estimation
    for a binomial proportion", Statistical Science 16:101) recommend for small n:
    - the Wilson score interval (Wilson 1927, "Probable inference, the law of succession, and statistical
      inference", JASA 22:209), method "wilson";
    - within 3 of 0 or n (2 up to n = 50), their modification ("modified wilson", section 4.1.1): the end on
      that side from the one-sided Poisson bound chi2(1 - confidence, 2x) / 2n. At 9 of 10 Wilson's upper end is
      0.982, and a true 0.99 was covered 0.904 of the time; modified, 0.995 and 0.996;
    - at 0 or n the exact Clopper-Pearson interval (Clopper & Pearson 1934, Biometrika 26:404) from the beta
      quantiles ("clopper-pearson"): at 10 of 10, 0.69-1 (Wilson's lower end, 0.72, sits too near).
    Measured coverage at a true 0.95 (benchmarks/interval_coverage.py): 0.925, 0.939, 0.962 at n = 20, 30, 50,
    where the percentile bootstrap gave 0.65, 0.73, 0.92; at n = 20 no interval of the count can be nearer:
    P(count >= 18) is 0.925 and P(count >= 17) 0.984. (NaN, NaN, None) for n = 0."""
    from scipy import stats

    if not n > 0 or not np.isfinite(successes):
        return NAN, NAN, None
    tail = (1 - confidence) / 2
    if successes <= 0 or successes >= n:
        low = 0.0 if successes <= 0 else float(stats.beta.ppf(tail, successes, n - successes + 1))
        high = 1.0 if successes >= n else float(stats.beta.ppf(1 - tail, successes + 1, n - successes))
        return low, high, "clopper-pearson"
    z = float(stats.norm.ppf(1 - tail))
    center = (successes + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(successes * (n - successes) / n + z * z / 4)
    low, high, method = center - half, center + half, "wilson"
    near = 2 if n <= 50 else 3
    if successes <= near:
        low, method = float(stats.chi2.ppf(1 - confidence, 2 * successes)) / (2 * n), "modified wilson"
    if n - successes <= near:
        high, method = 1 - float(stats.chi2.ppf(1 - confidence, 2 * (n - successes))) / (2 * n), "modified wilson"
    return low, high, method


def score_interval(value, bootstrap, trials, confidence=CONFIDENCE):
    """(low, high, method) of a score that is not a proportion: the bootstrap's percentile interval
    `bootstrap` (low, high); where that collapses to one value (every resample alike: a perfect AUC, an F1 of
    1), the proportion interval of the value over `trials`, the independent trials the score rests on.

    For an AUC `trials` is min(positives, negatives): an AUC of 1 needs every positive above every negative,
    and so in particular each of `trials` disjoint (positive, negative) pairs ordered right, each with
    probability AUC; P(AUC 1 observed) <= AUC ** trials, so Clopper-Pearson's lower end for trials of trials,
    0.025 ** (1 / trials), holds at 97.5% whatever the score distributions (the worst case of Bamber 1975,
    J. Math. Psychol. 12:387, whose variance bound AUC (1 - AUC) / min(positives, negatives) is that of a
    proportion over the smaller group). For F1, a harmonic mean of precision and recall, `trials` is the
    class's support (F1 < x needs recall or precision < x); for a macro average the smallest of its classes';
    for ECE the image count. Measured coverage of perfect AUCs: see tests/test_intervals.py."""
    low, high = bootstrap
    if not (np.isfinite(value) and np.isfinite(low) and np.isfinite(high)):
        return NAN, NAN, None
    if high - low > 1e-12:
        return float(low), float(high), "bootstrap"
    if not trials > 0:
        return NAN, NAN, None
    successes = value * trials
    successes = round(successes) if abs(successes - round(successes)) < 1e-9 else successes
    low, high, method = proportion_interval(successes, trials, confidence)
    return low, high, f"{method} ({trials} trials)"


def bootstrap_counts(labels, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, stratified=False):
    """(resamples, N) int: how often each image is drawn in each resample, N draws with replacement. With
    `stratified` each class's images are drawn as many times as the class has images (multi-label: each set of
    labels'), so that every resample keeps the class counts."""
    return draw_counts(np.random.default_rng(seed), strata(labels, stratified), resamples, len(labels))


def strata(labels, stratified):
    labels = np.asarray(labels)
    if not stratified or len(labels) == 0:
        return [np.arange(len(labels))]
    keys = np.nan_to_num(labels.reshape(len(labels), -1), nan=-1.0)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    return [np.flatnonzero(group.ravel() == g) for g in np.unique(group)]


def draw_counts(rng, groups, resamples, count):
    flat_draws = []  # resample * N + image, for every draw
    for members in groups:
        drawn = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        flat_draws.append((np.arange(resamples)[:, None] * count + drawn).ravel())
    flat_draws = np.concatenate(flat_draws) if flat_draws else np.zeros(0, np.int64)
    return np.bincount(flat_draws, minlength=resamples * count).reshape(resamples, count)


def bootstrap_resamples(count):
    """How many resamples the bootstrap of `count` images draws (see BOOTSTRAP_DRAWS)."""
    return int(np.clip(BOOTSTRAP_DRAWS // max(count, 1), BOOTSTRAP_MIN_RESAMPLES, BOOTSTRAP_RESAMPLES))


def percentiles(values, tail):
    finite = values[np.isfinite(values)]
    return tuple(np.percentile(finite, [tail, 100 - tail]).tolist()) if len(finite) else (NAN, NAN)
