"""Multi-label: images with several labels at once, from a ';'-separated label column or 0/1 columns."""

import csv

import numpy as np
import pytest
import torch
from conftest import FAST, read_rows, run_train, write_csv
from PIL import Image

import exported
import metrics
import plots
import recipe
import splits
import train
from errors import DataError
from labels import LabelFormat, label_matrix, read_label_columns, read_labels

SHAPES = ["blue", "green", "red"]


def write_shapes(folder, count=120, seed=0):
    """`count` 40x40 images of dark noise with a bright square of each colour present or not (half the time):
    the colours present are the image's labels. Returns (labels.csv with 'a;b' sets, columns.csv with 0/1)."""
    rng = np.random.default_rng(seed)
    root = folder / "images"
    root.mkdir()
    rows = []
    for i in range(count):
        pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
        present = [name for name in SHAPES if rng.random() < 0.5]
        for name in present:
            x, y = rng.integers(0, 26, 2)
            pixels[y : y + 14, x : x + 14, "rgb".index(name[0])] = 240
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append((f"{i}.png", ";".join(present)))
    sets = write_csv(folder / "labels.csv", rows)
    columns = write_csv(folder / "columns.csv", [(image, *(int(n in labels.split(";")) for n in SHAPES))
                                                 for image, labels in rows], header=("image", *SHAPES))  # fmt: skip
    return sets, columns, root


def image_sets(csv_path, root, **format_flags):
    train_set, val_set, _, class_names, _ = splits.labelled_image_sets(
        csv=str(csv_path), root=str(root), val_split=0.3, seed=0, label_format=LabelFormat(**format_flags)
    )
    return train_set, val_set, class_names


# ---------------------------------------------------------------------------------------------- input


def test_both_csv_shapes_give_the_same_classes_and_targets(tmp_path):
    sets, columns, root = write_shapes(tmp_path, count=30)
    from_sets = image_sets(sets, root)
    from_columns = image_sets(columns, root, columns="all")
    assert from_sets[2] == from_columns[2] == SHAPES
    for a, b in zip(from_sets[:2], from_columns[:2]):
        assert a.multi_label and b.multi_label
        assert list(a.samples["image"]) == list(b.samples["image"])
        np.testing.assert_array_equal(label_matrix(a.samples, SHAPES), label_matrix(b.samples, SHAPES))


def test_an_empty_label_set_is_an_image_without_labels(tmp_path):
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "cat;dog"), ("b.png", ""), ("c.png", "dog")])
    samples = read_labels(csv_path, label_sep=";")
    np.testing.assert_array_equal(label_matrix(samples, ["cat", "dog"]), [[1, 1], [0, 0], [0, 1]])


def test_a_label_set_is_sorted_and_without_repeats(tmp_path):
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "dog| cat|dog")])
    assert list(read_labels(csv_path, label_sep="|")["label"]) == ["cat;dog"]


def test_uncertain_minus_one_is_an_error_that_names_the_row_and_column(tmp_path):
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "1", "0"), ("b.png", "-1.0", "1")], ("image", "A", "B"))
    with pytest.raises(DataError, match=r"line 3: column 'A' is -1.0 \(uncertain\).*--uncertain"):
        read_label_columns(csv_path, "A,B")


@pytest.mark.parametrize("policy, expected", [("zero", 0.0), ("one", 1.0), ("ignore", np.nan)])
def test_uncertain_policies(tmp_path, policy, expected):
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "-1", "1")], ("image", "A", "B"))
    samples, classes = read_label_columns(csv_path, "A,B", policy)
    np.testing.assert_array_equal(label_matrix(samples, classes), [[expected, 1.0]])


def test_a_label_column_value_other_than_0_1_or_empty_names_the_row(tmp_path):
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "1", ""), ("b.png", "yes", "0")], ("image", "A", "B"))
    with pytest.raises(DataError, match=r"l.csv line 3: column 'A' is 'yes'; a label column holds 1, 0 or empty"):
        read_label_columns(csv_path, "all")


def test_a_column_whose_only_values_are_0_and_ignored_uncertain_still_splits(tmp_path):
    rows = [(f"{i}.png", str(i % 2), "-1" if i % 3 else "0") for i in range(12)]  # B: never positive
    csv_path = write_csv(tmp_path / "l.csv", rows, ("image", "A", "B"))
    for i in range(12):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    train_set, val_set, class_names = image_sets(csv_path, tmp_path, columns="A,B", uncertain="ignore")
    assert class_names == ["A", "B"] and len(train_set.samples) + len(val_set.samples) == 12


def test_label_cols_naming_a_missing_column_is_an_error(tmp_path):
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "1")], ("image", "A"))
    with pytest.raises(DataError, match=r"no column 'C'.*check --label-cols"):
        read_label_columns(csv_path, "A,C")


def test_folders_with_a_multi_label_flag_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    assert run_train("--data", tmp_path, "--label-cols", "all", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "multi-label" in err and "--csv" in err


def test_label_sep_with_label_cols_is_a_one_line_error(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "1")], ("image", "A"))
    assert run_train("--csv", csv_path, "--label-cols", "A", "--label-sep", "|", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--label-sep" in err and "--label-cols" in err


def test_the_stratified_split_keeps_every_label_in_both_parts(tmp_path):
    sets, _, root = write_shapes(tmp_path, count=40)
    train_set, val_set, class_names = image_sets(sets, root)
    for part in (train_set, val_set):
        assert (label_matrix(part.samples, class_names).sum(0) > 0).all()
    assert abs(len(val_set.samples) - 12) <= 2


# -------------------------------------------------------------------------------------------- metrics


def random_label_predictions(count=60, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(count, classes, generator=generator) < 0.4).float()
    logits = 2 * labels + torch.randn(count, classes, generator=generator)  # informative, not perfect
    return metrics.Predictions(torch.arange(count), labels, torch.nn.functional.logsigmoid(logits), logits)


def average_precision_by_ranks(scores, positive):
    """AP as the mean, over the positives, of the precision among the images scored at least as high."""
    return np.mean([((scores >= s) & positive).sum() / (scores >= s).sum() for s in scores[positive]])


def pair_count_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


def test_average_precision_and_auc_equal_values_computed_by_hand():
    predictions = random_label_predictions()
    scores = metrics.label_scores(predictions, [0.5] * 3)
    for c in range(3):
        probabilities, positive = predictions.probabilities[:, c].numpy(), predictions.labels[:, c].numpy() > 0
        assert scores["ap"][c] == pytest.approx(average_precision_by_ranks(probabilities, positive), abs=1e-6)
        assert scores["auc"][c] == pytest.approx(pair_count_auc(probabilities, positive), abs=1e-6)


def test_f1_micro_f1_and_exact_match_from_counts():
    predictions = random_label_predictions()
    thresholds = [0.3, 0.5, 0.7]
    predicted = predictions.probabilities.numpy() >= np.array(thresholds)
    true = predictions.labels.numpy() > 0
    rows = {row["label"]: row for row in metrics.label_report(predictions, SHAPES, thresholds)}
    tp, fp, fn = ((predicted & true).sum(0), (predicted & ~true).sum(0), (~predicted & true).sum(0))
    for c, name in enumerate(SHAPES):
        assert rows[name]["f1"] == pytest.approx(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]))
    assert rows["micro f1"]["value"] == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    assert rows["exact match"]["value"] == pytest.approx((predicted == true).all(1).mean())
    assert rows["map"]["value"] == pytest.approx(np.mean([rows[name]["ap"] for name in SHAPES]))


def test_each_class_threshold_is_the_best_f1_of_any_threshold():
    predictions = random_label_predictions(seed=1)
    for c, threshold in enumerate(metrics.choose_thresholds(predictions)):
        probabilities, true = predictions.probabilities[:, c].numpy(), predictions.labels[:, c].numpy() > 0

        def f1(t, probabilities=probabilities, true=true):
            predicted = probabilities >= t
            return 2 * (predicted & true).sum() / (predicted.sum() + true.sum())

        assert f1(threshold) == pytest.approx(max(f1(t) for t in probabilities))


def test_unknown_labels_are_left_out_of_the_loss_and_the_scores():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    known = ~targets.isnan()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert recipe.MultiLabelLoss()(logits, targets).item() == pytest.approx(expected.item())
    predictions = metrics.Predictions(torch.arange(2), targets, torch.nn.functional.logsigmoid(logits), logits)
    assert metrics.mean_loss(predictions) == pytest.approx(expected.item(), abs=1e-6)
    assert metrics.label_scores(predictions, [0.5, 0.5])["support"] == [1, 1]


def test_balanced_class_weights_are_each_class_negatives_over_positives():
    args = train.get_args_parser().parse_args(["--class-weights", "balanced"])
    targets = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    loss_fn = train.build_loss(args, targets, 2, torch.device("cpu"))
    assert loss_fn.bce.pos_weight.tolist() == pytest.approx([1 / 3, 3.0])


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One multi-label run on the shapes (both shapes of CSV are equivalent, tested above)."""
    folder = tmp_path_factory.mktemp("shapes")
    sets, _, root = write_shapes(folder)
    run_dir = folder / "run"
    with pytest.MonkeyPatch.context() as patch:  # as conftest's no_pictures, for a module-scoped run
        for name in plots.DRAWINGS:
            patch.setattr(plots, name, lambda *args, **kwargs: None)
        flags = ["--epochs", "6", "--lr", "1e-3", "--batch-size", "16"]
        status = run_train("--csv", sets, "--root", root, "--output-dir", run_dir, *FAST, *flags)
    assert status == 0
    return run_dir, root


def test_a_multi_label_run_learns_the_shapes(trained):
    run_dir, _ = trained
    rows = read_rows(run_dir / "metrics.csv")
    chance = 0.5  # each shape is present in half of the images: a random ranking's AP
    assert max(float(row["val_map"]) for row in rows) > chance + 0.3


def test_the_report_is_computed_from_the_saved_predictions(trained):
    run_dir, _ = trained
    predictions = read_rows(run_dir / "val_predictions.csv")
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert checkpoint["multi_label"] and len(checkpoint["thresholds"]) == 3
    report = {row["label"]: row for row in read_rows(run_dir / "report.csv")}
    for c, name in enumerate(SHAPES):
        scores = np.array([float(row[f"p_{name}"]) for row in predictions])
        positive = np.array([name in row["labels"].split(";") for row in predictions])
        assert float(report[name]["ap"]) == pytest.approx(average_precision_by_ranks(scores, positive), abs=1e-4)
        predicted = np.array([name in row["predicted"].split(";") for row in predictions])
        # the CSV keeps 6 significant digits, so an image on its class's threshold could read either way
        threshold = checkpoint["thresholds"][c]
        clear = ~np.isclose(scores, threshold, rtol=1e-5, atol=0)
        assert (predicted == (scores >= threshold))[clear].all()


def test_thresholds_round_trip_through_best_pt_onnx_and_predict(trained, tmp_path):
    import export
    import predict

    run_dir, root = trained
    assert export.run_cli([str(run_dir / "best.pt"), "--out", str(tmp_path / "model.onnx")]) == 0
    import onnx

    meta = onnx.load(tmp_path / "model.onnx").metadata_props
    info = exported.check_metadata(next(p.value for p in meta if p.key == exported.METADATA_KEY), "model.onnx")
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert info["multi_label"] and info["thresholds"] == checkpoint["thresholds"]
    images = [str(root / f"{i}.png") for i in range(12)]
    outputs = []
    for model in (run_dir / "best.pt", tmp_path / "model.onnx"):
        out = tmp_path / f"{model.suffix[1:]}.csv"
        assert predict.run_cli([str(model), *images, "--out", str(out), "--device", "cpu"]) == 0
        outputs.append(read_rows(out))
    assert [row["labels"] for row in outputs[0]] == [row["labels"] for row in outputs[1]]
    assert list(outputs[0][0]) == ["image", "labels", *SHAPES]
    with open(tmp_path / "pt.csv", newline="") as f:  # the sets follow the thresholds saved in best.pt
        for row in csv.DictReader(f):
            chosen = [n for n, t in zip(SHAPES, checkpoint["thresholds"]) if float(row[n]) >= t]
            assert row["labels"] == ";".join(chosen)
    fixed = tmp_path / "fixed.csv"  # --threshold replaces them for every class
    assert predict.run_cli([str(run_dir / "best.pt"), *images, "--threshold", "0.3", "--out", str(fixed)]) == 0
    for row in read_rows(fixed):
        assert row["labels"] == ";".join(n for n in SHAPES if float(row[n]) >= 0.3)


def test_evaluate_and_predict_read_label_sets_where_no_value_holds_a_separator(trained, tmp_path, capsys):
    """A multi-label model's CSV is read as label sets even when every image has at most one label."""
    import predict

    run_dir, root = trained
    rows = [("0.png", ""), ("1.png", "red"), ("2.png", "blue"), ("3.png", ""), ("4.png", "green")]
    csv_path = write_csv(tmp_path / "single.csv", rows)
    flags = ["--evaluate", run_dir / "best.pt", "--val-csv", csv_path, "--root", root, "--output-dir", tmp_path]
    assert run_train(*flags) == 0
    assert "map" in {row["label"] for row in read_rows(tmp_path / "report.csv")}
    out = tmp_path / "predicted.csv"
    assert predict.run_cli([str(run_dir / "best.pt"), str(csv_path), "--root", str(root), "--out", str(out)]) == 0
    assert "exact-match accuracy" in capsys.readouterr().err and len(read_rows(out)) == 5


def test_grad_cam_gives_a_multi_label_models_own_probabilities(trained, tmp_path):
    import predict

    run_dir, root = trained
    images = [str(root / f"{i}.png") for i in range(4)]
    outputs = []
    for extra in ([], ["--cam", str(tmp_path / "cam")]):
        out = tmp_path / f"{len(extra)}.csv"
        assert predict.run_cli([str(run_dir / "best.pt"), *images, "--out", str(out), "--device", "cpu", *extra]) == 0
        outputs.append(read_rows(out))
    for plain, with_cam in zip(*outputs):  # sigmoids, not a softmax over the classes
        assert plain["labels"] == with_cam["labels"]
        assert [float(plain[n]) for n in SHAPES] == pytest.approx([float(with_cam[n]) for n in SHAPES], abs=1e-5)
    assert len(list((tmp_path / "cam").glob("*_cam.jpg"))) == 4
