"""The frozen operating point and temperature (decision.py), external validation, subgroups, test-time
augmentation, and comparing two models (paired.py, compare.py)."""

import math

import numpy as np
import pytest
import torch
from conftest import FAST, make_image, read_rows, run_train, write_csv
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

import compare
import decision
import export
import metrics
import models
import paired
import predict
import presets
from intervals import proportion_interval

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """A tiny binary run with a test CSV and a site column (--subgroup-col site), exported to ONNX:
    (run directory, images folder, test CSV)."""
    base = tmp_path_factory.mktemp("binary")
    rng = np.random.default_rng(1)
    root = base / "images"
    root.mkdir()
    rows, test_rows = [], []
    for label_index, label in enumerate(CLASSES):
        for i in range(26):
            name = f"{label}_{i}.png"
            make_image(root / name, label_index, rng)
            # a quarter of the training CSV's labels wrong, so that validation has mistakes to calibrate against
            given = CLASSES[1 - label_index] if i < 16 and i % 4 == 1 else label
            (test_rows if i >= 16 else rows).append((name, given, "A" if i % 3 else "B"))
    header = ("image", "label", "site")
    csv_path, test_csv = write_csv(base / "train.csv", rows, header), write_csv(base / "test.csv", test_rows, header)
    run_dir = base / "run"
    flags = ["--test-csv", test_csv, "--subgroup-col", "site", "--epochs", "2", "--lr", "3e-4"]
    assert run_train("--csv", csv_path, "--root", root, "--output-dir", run_dir, *FAST, *flags) == 0
    assert export.run_cli([str(run_dir / "best.pt")]) == 0
    return run_dir, root, test_csv


def by_label(path):
    return {row["label"]: row for row in read_rows(path)}


def positive_scores(path):
    rows = read_rows(path)
    return np.array([float(r["p_malignant"]) for r in rows]), np.array([r["label"] == "malignant" for r in rows])


def test_the_threshold_is_the_youden_point_of_the_saved_validation_predictions(binary_run):
    run_dir, _, _ = binary_run
    scores, positive = positive_scores(run_dir / "val_predictions.csv")
    fpr, tpr, thresholds = roc_curve(positive, scores)
    youden = thresholds[np.argmax(tpr - fpr)]
    point = torch.load(run_dir / "best.pt", weights_only=True)["operating_point"]
    assert point["rule"] == "youden" and point["positive"] == 1 and point["thresholds"][0] is None
    # the CSVs hold 6 significant digits
    assert point["thresholds"][1] == pytest.approx(youden, rel=1e-5)
    assert float(by_label(run_dir / "report.csv")["malignant"]["threshold"]) == pytest.approx(youden, rel=1e-5)


def test_the_test_report_counts_sensitivity_and_specificity_at_the_frozen_threshold(binary_run):
    run_dir, _, _ = binary_run
    threshold = torch.load(run_dir / "best.pt", weights_only=True)["operating_point"]["thresholds"][1]
    scores, positive = positive_scores(run_dir / "test_predictions.csv")
    decided = scores >= threshold
    row = by_label(run_dir / "test_report.csv")["malignant"]
    assert float(row["threshold"]) == pytest.approx(threshold, rel=1e-5)  # frozen, not chosen again on the test images
    expected = {
        "sensitivity": (decided & positive).sum() / positive.sum(),
        "specificity": (~decided & ~positive).sum() / (~positive).sum(),
        "ppv": (decided & positive).sum() / max(decided.sum(), 1),
        "npv": (~decided & ~positive).sum() / max((~decided).sum(), 1),
    }
    for name, value in expected.items():
        assert float(row[f"op_{name}"]) == pytest.approx(value, rel=1e-5)
    low, high, _ = proportion_interval(int((decided & positive).sum()), int(positive.sum()))
    assert (float(row["op_sensitivity_low"]), float(row["op_sensitivity_high"])) == pytest.approx((low, high), rel=1e-5)
    decisions = [r["decision"] for r in read_rows(run_dir / "test_predictions.csv")]
    assert decisions == ["malignant" if d else "benign" for d in decided]


def test_best_pt_onnx_and_predict_decide_alike(binary_run, tmp_path):
    run_dir, root, test_csv = binary_run
    decided = {}
    for name in ("best.pt", "best.onnx"):
        out = tmp_path / f"{name}.csv"
        argv = [run_dir / name, test_csv, "--root", root, "--out", out, "--workers", "0", "--device", "cpu"]
        assert predict.run_cli([str(a) for a in argv]) == 0
        decided[name] = {row["image"]: row["decision"] for row in read_rows(out)}
    reported = {row["image"]: row["decision"] for row in read_rows(run_dir / "test_predictions.csv")}
    assert decided["best.pt"] == decided["best.onnx"] == reported


def test_the_calibrated_probabilities_are_the_same_from_best_pt_and_onnx(binary_run, tmp_path):
    run_dir, root, test_csv = binary_run
    temperature = torch.load(run_dir / "best.pt", weights_only=True)["temperature"]
    assert temperature is not None and temperature != 1.0
    probabilities = []
    for name in ("best.pt", "best.onnx"):
        out = tmp_path / f"{name}.csv"
        argv = [run_dir / name, test_csv, "--root", root, "--out", out, "--workers", "0", "--device", "cpu"]
        assert predict.run_cli([str(a) for a in argv]) == 0
        probabilities.append([float(row["malignant"]) for row in read_rows(out)])
    reported = [float(row["p_malignant"]) for row in read_rows(run_dir / "test_predictions.csv")]
    assert probabilities[0] == pytest.approx(reported, abs=1e-5)
    assert probabilities[1] == pytest.approx(reported, abs=1e-5)


def test_each_subgroup_s_auc_is_scikit_learn_s_on_its_rows(binary_run, capsys):
    run_dir, _, test_csv = binary_run
    site = {row["image"]: row["site"] for row in read_rows(test_csv)}
    rows = read_rows(run_dir / "test_predictions.csv")
    subgroups = {row["value"]: row for row in read_rows(run_dir / "test_subgroups.csv")}
    assert set(subgroups) == {"A", "B"}
    for value, row in subgroups.items():
        members = [r for r in rows if site[r["image"]] == value]
        truth = [r["label"] == "malignant" for r in members]
        assert int(row["n"]) == len(members) and int(row["positives"]) == sum(truth)
        assert float(row["auc"]) == pytest.approx(roc_auc_score(truth, [float(r["p_malignant"]) for r in members]))
        assert float(row["auc_low"]) <= float(row["auc"]) <= float(row["auc_high"])
        assert "too few" in row["warning"]  # 20 test images: every subgroup is under 30
    assert (run_dir / "subgroups.csv").exists()  # the validation images' too


def test_evaluate_on_external_data_writes_its_own_report_folder_at_the_frozen_point(binary_run, capsys):
    run_dir, root, test_csv = binary_run
    assert run_train("--evaluate", run_dir / "best.pt", "--csv", test_csv, "--root", root) == 0
    folder = run_dir / "evaluate_test"
    for name in ("report.csv", "val_predictions.csv", "confusion_matrix.csv", "report.html"):
        assert (folder / name).is_file()
    external, test = by_label(folder / "report.csv"), by_label(run_dir / "test_report.csv")
    assert int(external["accuracy"]["support"]) == 20  # every image of the CSV, not a split of it
    for column in ("threshold", "op_sensitivity", "op_specificity", "op_sensitivity_low", "auc"):
        assert external["malignant"][column] == test["malignant"][column]
    assert "frozen on the validation images" in capsys.readouterr().out


def test_tta_averages_the_probabilities_of_the_flipped_views_then_calibrates(binary_run, tmp_path):
    run_dir, root, _ = binary_run
    images = [root / "benign_3.png", root / "malignant_5.png"]
    plain, flipped = tmp_path / "plain.csv", tmp_path / "tta.csv"
    common = ["--workers", "0", "--device", "cpu"]
    assert predict.run_cli([str(run_dir / "best.pt"), *map(str, images), "--out", str(plain), *common]) == 0
    assert predict.run_cli([str(run_dir / "best.pt"), *map(str, images), "--out", str(flipped), "--tta", "flip",
                            *common]) == 0  # fmt: skip
    with_tta = [float(row["malignant"]) for row in read_rows(flipped)]
    without = [float(row["malignant"]) for row in read_rows(plain)]
    assert with_tta != pytest.approx(without, abs=1e-6)

    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    model = models.build_model(checkpoint["model_name"], len(CLASSES))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    transform = presets.eval_transform(checkpoint["image_size"], checkpoint["resize_size"])
    mean, std = presets.channel_constants(checkpoint["mean"]), presets.channel_constants(checkpoint["std"])
    for path, expected in zip(images, with_tta):
        view = transform(Image.open(path).convert("RGB"))[None]
        views = torch.cat([view, view.flip(-1)])
        with torch.no_grad():
            logits = model(presets.normalize(views, mean, std))
        # the mean of the views' probabilities, then calibrated by the run's temperature as any prediction is
        averaged = logits.softmax(1).mean(0)
        calibrated = (averaged.log() / checkpoint["temperature"]).softmax(0)[1]
        assert expected == pytest.approx(float(calibrated), abs=1e-5)


def test_the_five_crops_and_their_flips_are_ten_views(binary_run):
    views = presets.tta_transform(32, 36, "crops")(Image.new("RGB", (40, 50)))
    assert views.shape == (10, 3, 32, 32)
    logits = torch.randn(4, 10, 3)
    averaged = models.average_views(logits, multi_label=False)
    assert averaged.softmax(1) == pytest.approx(logits.softmax(2).mean(1), abs=1e-6)


# ------------------------------------------------------------------------------------------- temperature


def overconfident(seed=0, n=400, classes=3, scale=4.0):
    """Predictions of a model whose logits are `scale` times what its accuracy supports."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 1.0
    logits = torch.tensor(logits * scale)
    return metrics.Predictions(torch.arange(n), torch.tensor(labels), logits.log_softmax(1))


def test_temperature_above_one_for_an_overconfident_model_lowers_the_nll():
    predictions = overconfident()
    temperature = decision.fit_temperature(predictions)
    calibrated = decision.with_temperature(predictions, temperature)
    assert temperature > 1
    assert metrics.mean_loss(calibrated) < metrics.mean_loss(predictions)
    assert torch.equal(calibrated.predicted, predictions.predicted)


def test_temperature_is_the_minimum_of_a_grid_search():
    predictions = overconfident(seed=3, scale=2.5)
    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 4001))
    losses = [metrics.mean_loss(decision.with_temperature(predictions, t)) for t in grid]
    assert decision.fit_temperature(predictions) == pytest.approx(grid[int(np.argmin(losses))], rel=0.02)


# ------------------------------------------------------------------------------------ operating-point rules


def brute_force(scores, positive, rule):
    """Every distinct score as a threshold, the rule's choice by its definition."""
    best = None
    for t in sorted(set(scores), reverse=True):
        decided = scores >= t
        sens = (decided & positive).sum() / positive.sum()
        spec = (~decided & ~positive).sum() / (~positive).sum()
        f1 = 2 * (decided & positive).sum() / (decided.sum() + positive.sum())
        value = {"youden": sens + spec - 1, "f1": f1}.get(rule)
        if rule in ("youden", "f1"):
            # youden: the first (highest) of equals; f1: the last (lowest)
            if best is None or value > best[0] or (rule == "f1" and value == best[0]):
                best = (value, t)
        elif rule == "sens=0.9" and sens >= 0.9 and best is None:
            best = (sens, t)
        elif rule == "spec=0.8" and spec >= 0.8:
            best = (spec, t)
    return best[1]


@pytest.mark.parametrize("rule", ["youden", "f1", "sens=0.9", "spec=0.8"])
def test_each_rule_chooses_the_threshold_its_definition_gives(rule):
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(20, 120))
        positive = rng.random(n) < 0.4
        positive[:2] = [True, False]
        scores = np.round(rng.random(n) * 0.6 + 0.3 * positive, 2)  # rounded: ties
        assert decision.threshold_for(scores, positive, rule) == brute_force(scores, positive, rule)


def test_a_sensitivity_target_is_met_and_no_higher_threshold_meets_it():
    rng = np.random.default_rng(2)
    positive = rng.random(200) < 0.3
    scores = rng.random(200) + positive
    threshold = decision.threshold_for(scores, positive, "sens=0.95")
    assert (scores[positive] >= threshold).mean() >= 0.95
    higher = np.nextafter(threshold, np.inf)
    assert (scores[positive] >= higher).mean() < 0.95


def test_the_sensitivity_interval_at_a_frozen_threshold_covers_95_percent():
    """Seeded coverage simulation: a frozen threshold of 0 on scores N(1, 1) for positives has sensitivity
    Phi(1) = 0.841; test sets of 50 to 300 images, half positive. (At 20 positives the Wilson interval's exact
    coverage is 0.971 here, the discreteness of so few trials: a binomial sum shows it, not a sampling error.)"""
    from scipy.stats import norm

    rng = np.random.default_rng(11)
    true_sensitivity = norm.cdf(1.0)
    for n in (50, 100, 300):
        covered = 0
        for _ in range(1000):
            positive = np.arange(n) < n // 2
            scores = rng.normal(size=n) + positive
            _, low, high = decision.proportions(scores >= 0, positive)["sensitivity"]
            covered += low <= true_sensitivity <= high
        assert 0.93 <= covered / 1000 <= 0.97, (n, covered)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--operating-point", "sens=2"], "--operating-point must be youden, f1, sens=X or spec=X"),
        (["--positive-class", "owl"], "--positive-class owl"),
        (["--tta"], "--tta is for --evaluate"),
        (["--subgroup-col", "scanner"], "--subgroup-col scanner: no such column"),
    ],
)
def test_operating_point_mistakes_are_one_line(flags, message, tiny_data, tmp_path, capsys):
    csv_path, root = tiny_data
    assert run_train("--csv", csv_path, "--root", root, "--output-dir", tmp_path / "run", *FAST, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ two models


def brute_force_delong_variance(scores_a, scores_b, positive):
    """The structural components from their definition (every positive-negative pair), and the variance of
    the AUC difference from them."""

    def components(scores):
        pos, neg = scores[positive][:, None], scores[~positive][None, :]
        psi = (pos > neg) + 0.5 * (pos == neg)
        return psi.mean(1), psi.mean(0)

    (v10_a, v01_a), (v10_b, v01_b) = components(scores_a), components(scores_b)
    s10, s01 = np.cov(np.stack([v10_a, v10_b])), np.cov(np.stack([v01_a, v01_b]))
    covariance = s10 / positive.sum() + s01 / (~positive).sum()
    return covariance


def test_delong_variance_equals_the_brute_force_structural_components():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(20, 200))
        positive = rng.random(n) < 0.4
        positive[:2] = [True, False]
        scores_a = np.round(rng.normal(size=n) + positive, 1)
        scores_b = np.round(scores_a + rng.normal(size=n), 1)
        result = paired.delong(scores_a, scores_b, positive)
        assert result["variance"] == pytest.approx(brute_force_delong_variance(scores_a, scores_b, positive), abs=1e-9)
        assert result["auc_a"] == pytest.approx(roc_auc_score(positive, scores_a), abs=1e-12)


def test_the_paired_bootstrap_interval_covers_the_true_auc_difference():
    """Seeded, 200 simulated pairs of correlated binormal models (AUCs Phi(1.2/sqrt 2) and Phi(0.8/sqrt 2)),
    100 images each."""
    from scipy.stats import norm

    rng = np.random.default_rng(9)
    true_difference = norm.cdf(1.2 / math.sqrt(2)) - norm.cdf(0.8 / math.sqrt(2))
    covered = 0
    for _ in range(200):
        positive = rng.random(100) < 0.5
        shared = rng.normal(size=100)
        scores_a = 0.7 * shared + math.sqrt(0.51) * rng.normal(size=100) + 1.2 * positive
        scores_b = 0.7 * shared + math.sqrt(0.51) * rng.normal(size=100) + 0.8 * positive

        def difference(weights, a=scores_a, b=scores_b, positive=positive):
            return metrics.weighted_auc(a, positive, weights) - metrics.weighted_auc(b, positive, weights)

        low, high = paired.paired_bootstrap(difference, positive, resamples=500, seed=int(rng.integers(1 << 30)))
        covered += low <= true_difference <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_compare_writes_the_paired_table_of_two_runs(binary_run, tmp_path, capsys):
    run_dir, _, _ = binary_run
    first = run_dir / "test_predictions.csv"
    rows = read_rows(first)
    # a second "model": the same images, its probabilities noisier and a quarter of them reversed
    rng = np.random.default_rng(0)
    noisy = [(r["image"], r["label"], float(np.clip(float(r["p_malignant"]) + rng.normal(0, 0.3), 0, 1)))
             for r in rows]  # fmt: skip
    noisy = [(i, label, 1 - p if n % 4 == 0 else p) for n, (i, label, p) in enumerate(noisy)]
    second = write_csv(tmp_path / "b.csv", [(i, label, 1 - p, p) for i, label, p in noisy],
                       header=("image", "label", "p_benign", "p_malignant"))  # fmt: skip
    assert compare.run_cli([str(first), str(second), "--out", str(tmp_path / "cmp")]) == 0
    table = {row["metric"]: row for row in read_rows(tmp_path / "cmp" / "compare.csv")}
    truth = [r["label"] == "malignant" for r in rows]
    auc_a = roc_auc_score(truth, [float(r["p_malignant"]) for r in rows])
    assert float(table["auc"]["a"]) == pytest.approx(auc_a)
    assert float(table["auc"]["b"]) == pytest.approx(roc_auc_score(truth, [p for _, _, p in noisy]))
    assert 0 <= float(table["auc"]["p_value"]) <= 1
    assert float(table["auc"]["ci_low"]) <= float(table["auc"]["difference"]) <= float(table["auc"]["ci_high"])
    assert "accuracy" in table and "DeLong p" in capsys.readouterr().out


def test_compare_refuses_files_of_different_images(binary_run, tmp_path, capsys):
    run_dir, _, _ = binary_run
    other = write_csv(tmp_path / "other.csv", [("x.png", "benign", 0.6, 0.4)],
                      header=("image", "label", "p_benign", "p_malignant"))  # fmt: skip
    assert compare.run_cli([str(run_dir / "test_predictions.csv"), str(other)]) == 2
    assert "not the same images" in capsys.readouterr().err


def test_the_readme_s_own_code_snippet_gives_predict_s_calibrated_probability(binary_run, tmp_path, capsys):
    from pathlib import Path

    run_dir, root, _ = binary_run
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Using the trained model")[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    image = root / "malignant_20.png"
    out = tmp_path / "one.csv"
    assert predict.run_cli([str(run_dir / "best.pt"), str(image), "--out", str(out), "--workers", "0"]) == 0
    row = read_rows(out)[0]
    capsys.readouterr()
    code = snippet.replace("runs/exp1/best.pt", str(run_dir / "best.pt")).replace("scan.png", str(image))
    exec(compile(code, "README.md", "exec"), {})
    label, probability = capsys.readouterr().out.split()
    assert label == row["label"] and float(probability) == pytest.approx(float(row["confidence"]), abs=1e-5)


def test_no_temperature_is_fitted_when_every_validation_image_is_right(capsys):
    predictions = overconfident(scale=1.0)
    right = metrics.Predictions(predictions.indices, predictions.log_probabilities.argmax(1),
                                predictions.log_probabilities)  # fmt: skip
    assert decision.fit_temperature(right) is None
    assert "no temperature is fitted" in capsys.readouterr().out
    assert decision.with_temperature(right, None) is right


def test_multi_label_thresholds_follow_the_rule_over_each_label_s_known_images():
    rng = np.random.default_rng(4)
    labels = (rng.random((80, 3)) < 0.4).astype(np.float32)
    labels[rng.random((80, 3)) < 0.1] = np.nan  # unknown labels take no part
    logits = torch.tensor(rng.normal(size=(80, 3)) + 1.5 * np.nan_to_num(labels))
    predictions = metrics.Predictions(torch.arange(80), torch.tensor(labels), logits.sigmoid().log(), logits)
    chosen = decision.choose_label_thresholds(predictions, "sens=0.9")
    for c, threshold in enumerate(chosen):
        known = ~np.isnan(labels[:, c])
        scores = predictions.probabilities[:, c].numpy()[known]
        rule_choice = decision.threshold_for(scores, labels[known, c] > 0.5, "sens=0.9")
        assert threshold == pytest.approx(rule_choice * (1 - decision.FLOAT32_MARGIN), rel=1e-12)
        assert (scores[labels[known, c] > 0.5] >= threshold).mean() >= 0.9
    best_f1 = metrics.choose_thresholds(predictions)
    assert decision.choose_label_thresholds(predictions, "f1") == pytest.approx(best_f1, rel=2e-6)


def test_evaluate_on_the_training_csv_by_another_spelling_reports_the_run_s_own_validation(binary_run, capsys):
    run_dir, root, test_csv = binary_run
    same_csv = test_csv.parent / "." / "train.csv"  # not the string the run saved, the same file
    out = run_dir / "again"
    assert run_train("--evaluate", run_dir / "best.pt", "--csv", same_csv, "--output-dir", out) == 0
    validated = sum(row["split"] == "val" for row in read_rows(run_dir / "split.csv"))
    assert int(by_label(out / "report.csv")["accuracy"]["support"]) == validated
    assert "chosen on these images: optimistic" in capsys.readouterr().out


def test_external_data_holding_training_images_is_warned_about(binary_run, tmp_path, capsys):
    run_dir, root, _ = binary_run
    trained = [row for row in read_rows(run_dir / "split.csv") if row["split"] == "train"][:3]
    mixed = write_csv(tmp_path / "mixed.csv", [(row["image"], row["label"]) for row in trained]
                      + [("benign_20.png", "benign"), ("malignant_21.png", "malignant")])  # fmt: skip
    assert run_train("--evaluate", run_dir / "best.pt", "--csv", mixed, "--root", root,
                     "--output-dir", tmp_path / "out") == 0  # fmt: skip
    assert "3 of the 5 images of" in capsys.readouterr().err


def test_compare_evaluates_two_checkpoints_on_a_csv_first(binary_run, tmp_path, capsys):
    run_dir, root, test_csv = binary_run
    argv = [run_dir / "best.pt", run_dir / "best.pt", "--csv", test_csv, "--root", root, "--out", tmp_path / "cmp"]
    assert compare.run_cli([str(a) for a in argv]) == 0
    table = {row["metric"]: row for row in read_rows(tmp_path / "cmp" / "compare.csv")}
    # the same model twice: no difference, and the AUC is the test report's
    assert float(table["accuracy"]["difference"]) == 0 and float(table["auc"]["difference"]) == 0
    scores, positive = positive_scores(run_dir / "test_predictions.csv")
    assert float(table["auc"]["a"]) == pytest.approx(roc_auc_score(positive, scores), abs=1e-6)
    assert (tmp_path / "cmp" / "a" / "report.html").is_file()


def test_predict_decides_the_validation_image_the_threshold_was_chosen_at_as_the_report_does(binary_run, tmp_path):
    run_dir, root, _ = binary_run
    reported = {row["image"]: row["decision"] for row in read_rows(run_dir / "val_predictions.csv")}
    images = write_csv(tmp_path / "val.csv", [(image, "") for image in reported], header=("image", "label"))
    for name in ("best.pt", "best.onnx"):
        out = tmp_path / f"{name}.csv"
        argv = [run_dir / name, images, "--root", root, "--out", out, "--workers", "0", "--device", "cpu"]
        assert predict.run_cli([str(a) for a in argv]) == 0
        assert {row["image"]: row["decision"] for row in read_rows(out)} == reported
