"""Splits that cannot leak: a patient's images stay on one side (--group-col, --group-pattern), and copies of
an image across train, val and test are found (duplicates.py)."""

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, make_image, read_rows, run_train, write_csv
from PIL import Image, ImageEnhance

import duplicates
import splits
from labels import ImageSet


def patients(seed, class_shares, count=40):
    """(labels, groups): `count` patients of 1-7 images each, one class per patient, drawn by class_shares."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for patient in range(count):
        images = int(rng.integers(1, 8))
        label = str(rng.choice(["benign", "malignant", "other"], p=class_shares))
        labels += [label] * images
        groups += [f"P{patient:03d}"] * images
    return np.array(labels), np.array(groups)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("class_shares", [(0.5, 0.5, 0.0), (0.6, 0.3, 0.1), (0.34, 0.33, 0.33)])
def test_no_patient_is_in_two_parts_and_each_class_keeps_its_share(seed, class_shares):
    labels, groups = patients(seed, class_shares)
    part = splits.assign_groups(labels, groups, [0.7, 0.3], seed)
    for patient in set(groups):
        assert len(set(part[groups == patient])) == 1, patient
    for label in set(labels):
        if (labels == label).sum() >= 20:  # enough patients of the class for its share to be kept
            assert abs(part[labels == label].mean() - 0.3) < 0.1, label


def test_the_same_seed_gives_the_same_grouped_split_and_another_seed_another():
    labels, groups = patients(0, (0.5, 0.5, 0.0))
    first = splits.assign_groups(labels, groups, [0.7, 0.3], seed=4)
    assert (splits.assign_groups(labels, groups, [0.7, 0.3], seed=4) == first).all()
    assert (splits.assign_groups(labels, groups, [0.7, 0.3], seed=5) != first).any()


@pytest.fixture
def patient_csv(tmp_path):
    """12 patients x 2 images (3 classes, 4 patients each) in a CSV with a patient_id column."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = []
    for patient in range(12):
        label_index = patient % 3
        for frame in range(2):
            name = f"P{patient:02d}_frame{frame}.png"
            make_image(tmp_path / "images" / name, label_index, rng)
            rows.append((name, ["cat", "dog", "fox"][label_index], f"P{patient:02d}"))
    csv_path = write_csv(tmp_path / "labels.csv", rows, header=("image", "label", "patient_id"))
    return csv_path, tmp_path / "images"


def test_group_col_keeps_every_patient_in_one_part_and_split_csv_names_the_group(patient_csv, tmp_path, capsys):
    csv_path, root = patient_csv
    argv = ["--csv", csv_path, "--root", root, "--group-col", "patient_id", "--epochs", "1", *FAST]
    assert run_train(*argv, "--output-dir", tmp_path / "run") == 0
    rows = read_rows(tmp_path / "run" / "split.csv")
    parts_of = {}
    for row in rows:
        assert row["group"] == row["image"][:3]
        parts_of.setdefault(row["group"], set()).add(row["split"])
    assert all(len(parts) == 1 for parts in parts_of.values()) and len(parts_of) == 12
    assert "grouped by patient_id: 12 groups" in capsys.readouterr().out


def image_sets(**sources):
    """splits.labelled_image_sets as train.py calls it, for the flags given as keywords."""
    return splits.labelled_image_sets(**sources, val_split=0.3, seed=0)


def test_a_patient_like_column_without_group_col_gives_a_hint(patient_csv, capsys):
    csv_path, root = patient_csv
    image_sets(csv=csv_path, root=root)
    assert "pass --group-col patient_id" in capsys.readouterr().err


def test_group_pattern_groups_folder_images_by_file_name(patient_csv, tmp_path):
    csv_path, root = patient_csv
    folder = tmp_path / "folders"
    for row in read_rows(csv_path):
        (folder / row["label"]).mkdir(parents=True, exist_ok=True)
        (folder / row["label"] / row["image"]).write_bytes((root / row["image"]).read_bytes())
    train_set, val_set, _, _, method = image_sets(data=folder, group_pattern=r"^(P\d+)_")
    for part in (train_set, val_set):
        assert (part.samples["group"] == part.samples["image"].str.split("/").str[-1].str[:3]).all()
    assert set(train_set.samples["group"]).isdisjoint(val_set.samples["group"])
    assert method.startswith("grouped by pattern: 12 groups")


def test_a_group_pattern_that_misses_a_file_names_it(patient_csv, tmp_path, capsys):
    csv_path, root = patient_csv
    argv = ["--csv", csv_path, "--root", root, "--group-pattern", r"^(Q\d+)_", *FAST, "--output-dir", tmp_path / "r"]
    assert run_train(*argv) == 2
    err = capsys.readouterr().err
    assert "--group-pattern" in err and "P00_frame0.png" in err and err.count("\n") == 1


def test_a_missing_group_column_is_named(patient_csv, tmp_path, capsys):
    csv_path, root = patient_csv
    assert run_train("--csv", csv_path, "--root", root, "--group-col", "subject", *FAST) == 2
    err = capsys.readouterr().err
    assert "'subject'" in err and "patient_id" in err and "--group-col" in err


def test_a_val_csv_sharing_patients_with_training_is_warned_about(patient_csv, tmp_path, capsys):
    csv_path, root = patient_csv
    rows = read_rows(csv_path)
    train_csv = write_csv(
        tmp_path / "train.csv", [tuple(r.values()) for r in rows[:18]], ("image", "label", "patient_id")
    )
    val_csv = write_csv(tmp_path / "val.csv", [tuple(r.values()) for r in rows[17:]], ("image", "label", "patient_id"))
    image_sets(csv=train_csv, root=root, val_csv=val_csv, group_col="patient_id")
    assert "train and val share 1 of their groups (first: P08)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ copies across parts


def smooth_image(rng, size=96):
    """A smooth synthetic picture: an 8x8 random colour field, enlarged bicubically."""
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def planted_copies(folder):
    """train and val ImageSets of 60 + 30 distinct smooth images (labels a, b in turn), and 4 copies of train
    images put in val: exact (another file name), resized 0.75x, JPEG quality 60, and brightness +10% with
    another label than its original's."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    rows = {"train": [], "val": []}
    for i in range(90):
        part = "train" if i < 60 else "val"
        smooth_image(rng).save(folder / f"{part}_{i}.png")
        rows[part].append((f"{part}_{i}.png", "ab"[i % 2]))
    Image.open(folder / "train_0.png").save(folder / "copy_exact.png")
    Image.open(folder / "train_3.png").resize((72, 72), Image.BILINEAR).save(folder / "copy_resized.png")
    Image.open(folder / "train_1.png").save(folder / "copy_jpeg.jpg", quality=60)
    ImageEnhance.Brightness(Image.open(folder / "train_2.png")).enhance(1.1).save(folder / "copy_bright.png")
    rows["val"] += [
        ("copy_exact.png", "a"),
        ("copy_resized.png", "b"),
        ("copy_jpeg.jpg", "b"),
        ("copy_bright.png", "b"),
    ]
    return {name: ImageSet(pd.DataFrame(r, columns=["image", "label"]), folder, name) for name, r in rows.items()}


def test_exact_and_near_copies_across_parts_are_found_and_nothing_else(tmp_path):
    found = duplicates.find_duplicates(planted_copies(tmp_path / "images"))
    by_copy = {pair["image_b"]: pair for pair in found.pairs}
    assert sorted(by_copy) == ["copy_bright.png", "copy_exact.png", "copy_jpeg.jpg", "copy_resized.png"]
    assert by_copy["copy_exact.png"]["kind"] == "exact" and by_copy["copy_exact.png"]["image_a"] == "train_0.png"
    assert {by_copy[name]["kind"] for name in ("copy_resized.png", "copy_jpeg.jpg", "copy_bright.png")} == {"near"}
    assert [by_copy[name]["image_a"] for name in ("copy_jpeg.jpg", "copy_bright.png")] == ["train_1.png", "train_2.png"]
    assert by_copy["copy_bright.png"]["same_label"] is False and by_copy["copy_jpeg.jpg"]["same_label"] is True
    assert found.within_parts == 0  # 90 distinct smooth images: no false pair


def test_copies_inside_one_part_are_counted_not_listed(tmp_path):
    parts = planted_copies(tmp_path / "images")
    parts["train"] = parts["train"]._replace(samples=pd.concat([parts["train"].samples, parts["val"].samples[-4:]]))
    parts["val"] = parts["val"]._replace(samples=parts["val"].samples[:30])
    found = duplicates.find_duplicates(parts)
    assert found.pairs == [] and found.within_parts == 4


def test_dedupe_drops_the_val_copies_and_duplicates_csv_lists_them(tmp_path, capsys):
    parts = planted_copies(tmp_path / "images")
    train_csv = write_csv(tmp_path / "train.csv", parts["train"].samples.itertuples(index=False))
    val_csv = write_csv(tmp_path / "val.csv", parts["val"].samples.itertuples(index=False))
    argv = ["--csv", train_csv, "--root", tmp_path / "images", "--val-csv", val_csv, "--epochs", "1", *FAST]
    assert run_train(*argv, "--dedupe", "--output-dir", tmp_path / "run") == 0
    listed = read_rows(tmp_path / "run" / "duplicates.csv")
    assert sorted(row["image_b"] for row in listed) == [
        "copy_bright.png",
        "copy_exact.png",
        "copy_jpeg.jpg",
        "copy_resized.png",
    ]
    val_images = [row["image"] for row in read_rows(tmp_path / "run" / "split.csv") if row["split"] == "val"]
    assert len(val_images) == 30 and not any(image.startswith("copy_") for image in val_images)
    err = capsys.readouterr().err
    assert "warning: 4 images in val copy an image of an earlier part (4 pairs: 1 exact, 3 near;" in err
    assert "--dedupe dropped those 4 images" in err
    assert "1 with different labels (labelling conflicts)" in err and "duplicates.csv" in err


# ------------------------------------------------------------------------------------------ --folds K


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    """--folds 3 --group-col patient_id on 12 patients x 2 images: (run folder, the CSV's rows)."""
    folder = tmp_path_factory.mktemp("cv")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    rows = []
    for patient in range(12):
        for frame in range(2):
            make_image(folder / "images" / f"P{patient:02d}_{frame}.png", patient % 3, rng)
            rows.append((f"P{patient:02d}_{frame}.png", "abc"[patient % 3], f"P{patient:02d}"))
    csv_path = write_csv(folder / "labels.csv", rows, header=("image", "label", "patient_id"))
    argv = ["--csv", csv_path, "--root", folder / "images", "--group-col", "patient_id", "--folds", "3"]
    assert run_train(*argv, "--epochs", "1", *FAST, "--no-duplicate-check", "--output-dir", folder / "run") == 0
    return folder / "run", rows


def test_folds_validate_every_image_exactly_once_and_keep_patients_together(cross_validated):
    run_dir, rows = cross_validated
    validated = []
    for fold in (1, 2, 3):
        split = read_rows(run_dir / f"fold{fold}" / "split.csv")
        validated += [row["image"] for row in split if row["split"] == "val"]
        val_patients = {row["group"] for row in split if row["split"] == "val"}
        assert val_patients.isdisjoint(row["group"] for row in split if row["split"] == "train")
    assert sorted(validated) == sorted(image for image, _, _ in rows)
    out_of_fold = read_rows(run_dir / "cv_predictions.csv")
    assert sorted(row["image"] for row in out_of_fold) == sorted(validated)
    assert {row["fold"] for row in out_of_fold} == {"1", "2", "3"}


def test_the_cv_summary_is_the_mean_and_sd_of_the_fold_reports(cross_validated):
    run_dir, _ = cross_validated
    summary = {row["metric"]: row for row in read_rows(run_dir / "cv_summary.csv")}
    for score in ("accuracy", "macro f1", "macro auc"):
        values = []
        for fold in (1, 2, 3):
            report = {row["label"]: row for row in read_rows(run_dir / f"fold{fold}" / "report.csv")}
            values.append(float(report[score]["value"]))
            assert float(summary[f"val {score}"][f"fold{fold}"]) == pytest.approx(values[-1], abs=1e-6)
        assert float(summary[f"val {score}"]["mean"]) == pytest.approx(np.mean(values), abs=1e-6)
        assert float(summary[f"val {score}"]["sd"]) == pytest.approx(np.std(values, ddof=1), abs=1e-5)


def test_folds_resume_at_the_interrupted_fold(tiny_data, tmp_path, capsys):
    csv_path, root = tiny_data
    argv = ["--csv", csv_path, "--root", root, "--folds", "2", "--epochs", "1", *FAST, "--output-dir", tmp_path / "cv"]
    assert run_train(*argv, "--fold", "1") == 0  # as if stopped after the first fold
    first = [(tmp_path / "cv" / "fold1" / name).stat().st_mtime_ns for name in ("best.pt", "last.pt")]
    assert not (tmp_path / "cv" / "cv_summary.csv").exists()
    assert run_train(*argv, "--resume") == 0
    assert [(tmp_path / "cv" / "fold1" / name).stat().st_mtime_ns for name in ("best.pt", "last.pt")] == first
    assert (tmp_path / "cv" / "fold2" / "best.pt").is_file() and (tmp_path / "cv" / "cv_summary.csv").is_file()
    page = (tmp_path / "cv" / "report.html").read_text()  # the cross-validation page links each fold's
    assert 'href="fold1/report.html"' in page and 'href="fold2/report.html"' in page and "folds-table" in page
    assert "fold 2 of 2" in capsys.readouterr().out


def test_fold_without_folds_is_refused(tiny_data, capsys):
    csv_path, root = tiny_data
    assert run_train("--csv", csv_path, "--root", root, "--fold", "2", *FAST) == 2
    assert "--fold 2 needs --folds" in capsys.readouterr().err
