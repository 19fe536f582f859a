"""report.py: what a run reports, as files a reader can trust (here: the cross-validation summary)."""

from conftest import read_rows, write_csv

import predict
import report


def make_folds(tmp_path, macro_aucs, multi_label=False):
    """Fold folders as --folds leaves them: a report.csv and a val_predictions.csv each ('' = undefined)."""
    for k, auc in enumerate(macro_aucs, 1):
        fold = tmp_path / f"fold{k}"
        fold.mkdir()
        rows = [("accuracy", "0.8"), ("macro f1", "0.7"), ("macro auc", auc)]
        if multi_label:
            rows += [("map", "0.9"), ("exact match", "0.5")]
        write_csv(fold / "report.csv", rows, header=("label", "value"))
        write_csv(fold / "val_predictions.csv", [(f"img{k}.png", "cat")], header=("image", "label"))


def test_a_fold_with_an_undefined_score_is_counted_and_said(tmp_path, capsys):
    make_folds(tmp_path, ["0.9", "0.8", "", "0.7", "0.6"])
    report.write_cv_summary(tmp_path, 5)
    summary = {row["metric"]: row for row in read_rows(tmp_path / "cv_summary.csv")}
    assert summary["val macro auc"]["folds"] == "4 of 5"
    assert abs(float(summary["val macro auc"]["mean"]) - 0.75) < 1e-9  # the mean of the four defined folds
    assert summary["val accuracy"]["folds"] == "5 of 5"
    assert "val macro auc 0.750 ± 0.129 (4 of 5 folds; undefined in the others)" in capsys.readouterr().out


def test_multi_label_scores_at_thresholds_tuned_on_the_fold_are_labelled_optimistic(tmp_path, capsys):
    make_folds(tmp_path, ["0.9", "0.8"], multi_label=True)
    report.write_cv_summary(tmp_path, 2)
    notes = {row["metric"]: row["note"] for row in read_rows(tmp_path / "cv_summary.csv")}
    assert notes["val macro f1"] == notes["val exact match"] == "optimistic: thresholds tuned on these images"
    assert notes["val map"] == notes["val macro auc"] == ""  # ranking scores need no threshold
    assert "val macro f1 0.700 ± 0.000 (optimistic)" in capsys.readouterr().out


def test_single_label_scores_are_not_labelled_optimistic(tmp_path):
    make_folds(tmp_path, ["0.9", "0.8"])
    report.write_cv_summary(tmp_path, 2)
    assert {row["note"] for row in read_rows(tmp_path / "cv_summary.csv")} == {""}


def test_a_bf16_run_reports_what_predict_gives_for_best_pt(train_tiny, tiny_data, tmp_path):
    # one model, one answer: the end-of-training report is computed in fp32, as predict.py is
    csv_path, root = tiny_data
    test_csv = write_csv(tmp_path / "test.csv", [(r["image"], r["label"]) for r in read_rows(csv_path)[::3]])
    status, run_dir = train_tiny("--epochs", "1", "--amp", "bf16", "--test-csv", test_csv)
    assert status == 0
    out = tmp_path / "predicted.csv"
    assert predict.run_cli([str(run_dir / "best.pt"), str(test_csv), "--root", str(root), "--out", str(out)]) == 0
    reported = {row["image"]: row for row in read_rows(run_dir / "test_predictions.csv")}
    predicted = {row["image"]: row for row in read_rows(out)}
    assert set(reported) == set(predicted) and len(reported) == 8
    for image, row in predicted.items():
        assert reported[image]["predicted"] == row["label"]
        for name in ("cat", "dog", "fox"):
            assert abs(float(reported[image][f"p_{name}"]) - float(row[name])) < 1e-5
