"""--data: class folders as the tutorial's ImageFolder way, the traps real folders hold, and a test set."""

import numpy as np
import pytest
import torch
from conftest import FAST, make_image, read_rows, run_train, write_csv

import devices
import predict
import presets
import train
from errors import DataError
from labels import image_folders

CLASSES = ["cat", "dog", "fox"]


def make_tree(folder, parts=("train", "val"), per_class=(6, 2), classes=CLASSES):
    """folder/<part>/<class>/<class>_<i>.png for each part; per_class images per class in each part."""
    rng = np.random.default_rng(0)
    for part, count in zip(parts, per_class):
        for index, name in enumerate(classes):
            (folder / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(folder / part / name / f"{name}_{i}.png", index, rng)
    return folder


def make_flat(folder, per_class=6, classes=CLASSES):
    make_tree(folder, parts=("",), per_class=(per_class,), classes=classes)
    return folder


def test_train_and_val_folders_give_sorted_classes_and_paths_relative_to_the_data_folder(tmp_path):
    data = make_tree(tmp_path / "flowers", parts=("train", "valid"))
    train_samples, val_samples, test_samples = image_folders(data)
    assert sorted(set(train_samples["label"])) == CLASSES
    assert len(train_samples) == 18 and len(val_samples) == 6 and test_samples is None
    assert all(p.startswith("train/") for p in train_samples["image"])
    assert all(p.startswith("valid/") for p in val_samples["image"])


def test_hidden_entries_and_stray_files_are_neither_classes_nor_images(tmp_path):
    data = make_flat(tmp_path / "flowers", per_class=2)
    (data / ".DS_Store").write_bytes(b"\0\0")
    (data / "notes.txt").write_text("stray file beside the class folders")
    (data / "__MACOSX" / "cat").mkdir(parents=True)
    (data / "__MACOSX" / "cat" / "._cat_0.png").write_bytes(b"junk")
    (data / ".ipynb_checkpoints").mkdir()
    (data / "cat" / ".ipynb_checkpoints").mkdir()
    (data / "cat" / ".ipynb_checkpoints" / "cat_0-checkpoint.png").write_bytes(b"junk")
    (data / "cat" / "._cat_0.png").write_bytes(b"junk")
    samples, _, _ = image_folders(data)
    assert sorted(set(samples["label"])) == CLASSES
    assert len(samples) == 6


def test_an_empty_class_folder_is_warned_about_by_name_and_is_not_a_class(tmp_path, capsys):
    data = make_flat(tmp_path / "flowers", per_class=2)
    (data / "owl").mkdir()
    samples, _, _ = image_folders(data)
    assert "owl" not in set(samples["label"])
    assert "owl" in capsys.readouterr().err


def test_a_class_in_val_that_train_lacks_is_an_error_naming_it(tmp_path):
    data = make_tree(tmp_path / "flowers")
    make_tree(data, parts=("val",), per_class=(1,), classes=["owl"])
    with pytest.raises(DataError, match="'owl' is in val but not in train"):
        image_folders(data)


def test_training_from_folders_writes_split_relative_to_the_data_folder_and_a_test_report(tmp_path):
    data = make_tree(tmp_path / "flowers", parts=("train", "val", "test"), per_class=(6, 2, 2))
    run_dir = tmp_path / "run"
    assert run_train("--data", data, *FAST, "--epochs", "1", "--output-dir", run_dir) == 0
    split = read_rows(run_dir / "split.csv")
    assert {r["split"] for r in split} == {"train", "val", "test"}
    assert all((data / r["image"]).is_file() for r in split)
    test_report = {r["label"]: r for r in read_rows(run_dir / "test_report.csv")}
    assert int(test_report["accuracy"]["support"]) == 6
    assert read_rows(run_dir / "test_confusion_matrix.csv")[0]["true\\predicted"] == "cat"


def test_the_test_set_never_chooses_the_best_checkpoint(tmp_path, tiny_data, monkeypatch):
    csv_path, root = tiny_data
    rows = read_rows(csv_path)
    test_csv = write_csv(tmp_path / "test.csv", [(r["image"], r["label"]) for r in rows[:4]])
    evaluated = []
    evaluate = train.evaluate

    def counting_evaluate(model, loader, *args, **kwargs):
        evaluated.append(len(loader.dataset))
        return evaluate(model, loader, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", counting_evaluate)
    argv = ["--csv", csv_path, "--root", root, "--test-csv", test_csv, *FAST, "--epochs", "2", "--amp", "off"]
    assert run_train(*argv, "--output-dir", tmp_path / "run") == 0
    # two epochs of validation (6 images), then best.pt, once, on the 4 test images; the validation report
    # reuses the predictions of best.pt's epoch (fp32 already: a bf16 run evaluates them again in fp32)
    assert evaluated == [6, 6, 4]


def test_a_flat_folder_of_classes_is_split_like_a_csv(tmp_path):
    data = make_flat(tmp_path / "flowers", per_class=10)
    run_dir = tmp_path / "run"
    assert run_train("--data", data, *FAST, "--epochs", "1", "--output-dir", run_dir) == 0
    val = [r for r in read_rows(run_dir / "split.csv") if r["split"] == "val"]
    assert sorted(r["label"] for r in val) == sorted(CLASSES * 3)  # stratified: 30% of each class
    assert all(r["image"].split("/")[0] == r["label"] for r in val)


def test_a_folder_run_resumes_evaluates_and_predicts_like_a_csv_run(tmp_path, capsys):
    data = make_tree(tmp_path / "flowers")
    run_dir = tmp_path / "run"
    assert run_train("--data", data, *FAST, "--epochs", "1", "--output-dir", run_dir) == 0
    assert run_train("--output-dir", run_dir, "--resume", "--epochs", "2") == 0
    assert [r["epoch"] for r in read_rows(run_dir / "metrics.csv")] == ["1", "2"]
    assert run_train("--evaluate", run_dir / "best.pt", "--output-dir", tmp_path / "eval") == 0
    assert int({r["label"]: r for r in read_rows(tmp_path / "eval" / "report.csv")}["accuracy"]["support"]) == 6
    val_csv = write_csv(tmp_path / "val.csv", [(f"val/cat/cat_{i}.png", "cat") for i in range(2)])
    argv = [
        "--evaluate",
        run_dir / "best.pt",
        "--val-csv",
        val_csv,
        "--val-root",
        data,
        "--output-dir",
        tmp_path / "e2",
    ]
    assert run_train(*argv) == 0
    assert int({r["label"]: r for r in read_rows(tmp_path / "e2" / "report.csv")}["accuracy"]["support"]) == 2
    capsys.readouterr()
    assert predict.run_cli([str(run_dir / "best.pt"), str(data / "val"), "--device", "cpu"]) == 0
    assert len(read_rows(run_dir / "predictions.csv")) == 6
    assert str(run_dir / "predictions.csv") in capsys.readouterr().err


def test_root_holding_class_folders_without_csv_is_read_as_data(tmp_path, capsys):
    data = make_flat(tmp_path / "flowers", per_class=4)
    assert run_train("--root", data, *FAST, "--epochs", "1", "--output-dir", tmp_path / "run") == 0
    assert "reading it as --data" in capsys.readouterr().err
    assert {r["label"] for r in read_rows(tmp_path / "run" / "split.csv")} == set(CLASSES)


def test_root_without_class_folders_or_csv_is_an_error_that_says_data(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert run_train("--root", tmp_path / "images", *FAST, "--output-dir", tmp_path / "run") == 2
    assert "--data" in capsys.readouterr().err


def test_skip_bad_images_drops_files_that_fail_the_first_check_and_says_how_many(tmp_path, capsys):
    data = make_tree(tmp_path / "flowers")
    (data / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    assert run_train("--data", data, *FAST, "--epochs", "1", "--output-dir", tmp_path / "strict") == 2
    assert "broken.png" in capsys.readouterr().err
    assert run_train("--data", data, *FAST, "--epochs", "1", "--output-dir", tmp_path / "run", "--skip-bad-images") == 0
    assert "dropped 1 unusable images" in capsys.readouterr().err
    assert "train/cat/broken.png" not in {r["image"] for r in read_rows(tmp_path / "run" / "split.csv")}


# ------------------------------------------------------------------------------------- flags and CSV traps


def test_a_flag_prefix_is_not_taken_for_the_flag(capsys):
    assert run_train("--epoch", "1") == 2
    assert "--epoch" in capsys.readouterr().err


def test_an_unknown_flag_suggests_the_closest_one(capsys):
    assert run_train("--img-size", "64") == 2
    assert "did you mean --image-size?" in capsys.readouterr().err


def test_a_csv_with_the_label_column_first_hints_that_the_columns_look_swapped(tmp_path, capsys):
    csv_path = write_csv(
        tmp_path / "swapped.csv", [("daisy", "a.jpg"), ("daisy", "b.jpg"), ("rose", "c.jpg")], header=("class", "file")
    )
    assert run_train("--csv", csv_path, *FAST, "--output-dir", tmp_path / "run") == 2
    assert "columns look swapped" in capsys.readouterr().err


def test_the_last_smaller_batch_trains(train_tiny, capsys):
    status, run_dir = train_tiny("--epochs", "1", "--batch-size", "5")  # 18 training images: 5 + 5 + 5 + 3
    assert status == 0
    assert "dropped" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------ gradient accumulation


def steps_of(batch_size, accum_steps, images, labels):
    """Weights after one epoch of train_one_epoch on a per-sample model (no BatchNorm) with plain SGD."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = [(images[i : i + batch_size], labels[i : i + batch_size], []) for i in range(0, len(images), batch_size)]
    ctx = devices.make_context(torch.device("cpu"), "off", presets.IMAGENET_MEAN, presets.IMAGENET_STD)
    args = train.get_args_parser().parse_args(["--accum-steps", str(accum_steps), "--epochs", "1"])
    loss_fn = torch.nn.CrossEntropyLoss()
    never_stopped = train.StopRequest()  # not entered: no signal handlers
    train.train_one_epoch(
        model, loss_fn, optimizer, scheduler, scaler, loader, ctx, args, 1, train.BadImageLog(False), never_stopped
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()]), scheduler.last_epoch


def test_accumulating_batches_equals_one_big_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    accumulated, accumulated_steps = steps_of(4, 3, images, labels)
    big, big_steps = steps_of(12, 1, images, labels)
    small, _ = steps_of(4, 1, images, labels)
    assert accumulated_steps == big_steps == 1  # the scheduler counts optimizer steps
    assert torch.allclose(accumulated, big, atol=1e-6)
    assert not torch.allclose(small, big, atol=1e-3)


def test_the_last_incomplete_accumulation_group_still_steps():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (20,))
    _, steps = steps_of(4, 3, images, labels)  # 5 batches: a group of 3, then a group of 2
    assert steps == 2


def test_accumulation_shows_the_effective_batch_and_resumes_exactly(train_tiny, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_tiny("--epochs", "2", "--accum-steps", "2", output_dir=straight)[0] == 0
    assert "batch 8 x 2 accumulated (global 16)" in capsys.readouterr().out
    assert train_tiny("--epochs", "1", "--accum-steps", "2", output_dir=resumed)[0] == 0
    assert run_train("--output-dir", resumed, "--resume", "--epochs", "2") == 0
    a, b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
