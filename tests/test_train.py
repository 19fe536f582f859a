"""End-to-end behaviour of train.py: what a run writes, and the checkpoint it leaves."""

import pytest
import torch
from conftest import FAST, read_rows, run_train, write_csv

import devices
import models
import presets
import train
from images import load_image
from labels import ImageSet, read_labels, sorted_class_names
from splits import split_samples


def test_run_writes_checkpoints_metrics_and_split(train_tiny):
    status, run_dir = train_tiny("--epochs", "2")
    assert status == 0
    for name in ("best.pt", "last.pt", "metrics.csv", "split.csv"):
        assert (run_dir / name).is_file(), name
    rows = read_rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0])[:7] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def test_checkpoint_is_a_plain_dict_that_loads_with_weights_only(train_tiny):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "best_acc",
        "history",
        "class_names",
        "model_name",
        "image_size",
        "resize_size",
        "mean",
        "std",
        "args",
        "version",
    ):
        assert key in checkpoint, key
    assert checkpoint["class_names"] == ["cat", "dog", "fox"]
    assert checkpoint["model_name"] == "resnet18"
    assert checkpoint["image_size"] == 32
    assert checkpoint["args"]["epochs"] == 1


def test_best_checkpoint_holds_what_predict_needs_without_the_optimizer_state(train_tiny):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    best = torch.load(run_dir / "best.pt", weights_only=True)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert "optimizer" not in best and "scheduler" not in best
    # best.pt adds what it is deployed with, chosen on the validation images after training
    shared = {k for k in last if k not in ("optimizer", "scheduler", "scaler")}
    assert best.keys() == shared | {"temperature", "operating_point"}
    # Adam keeps two moments per weight: without them best.pt is about a third of last.pt
    assert (run_dir / "best.pt").stat().st_size < 0.4 * (run_dir / "last.pt").stat().st_size


def test_best_checkpoint_rebuilds_a_model_that_predicts(train_tiny):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    model = models.build_model(checkpoint["model_name"], len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model"])
    logits = model.eval()(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 3)


def test_split_csv_lists_every_image_once_as_train_or_val(train_tiny, tiny_data):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    rows = read_rows(run_dir / "split.csv")
    assert sorted(r["image"] for r in rows) == sorted(r["image"] for r in read_rows(tiny_data[0]))
    assert {r["split"] for r in rows} == {"train", "val"}
    assert sum(r["split"] == "val" for r in rows) == 3 * round(8 * 0.3)  # stratified: 30% of each class


def test_same_seed_gives_same_disjoint_split_and_other_seed_another(tiny_data):
    images = ImageSet(read_labels(tiny_data[0]), tiny_data[1], "labels.csv")
    train_a, val_a, _ = split_samples(images, 0.3, seed=0, method="random")
    _, val_b, _ = split_samples(images, 0.3, seed=0, method="random")
    _, val_c, _ = split_samples(images, 0.3, seed=1, method="random")
    assert list(val_a.samples["image"]) == list(val_b.samples["image"])
    assert not set(train_a.samples["image"]) & set(val_a.samples["image"])
    assert len(train_a.samples) + len(val_a.samples) == len(images.samples)
    assert set(val_a.samples["image"]) != set(val_c.samples["image"])


def test_stratified_split_keeps_each_class_share(tiny_data):
    images = ImageSet(read_labels(tiny_data[0]), tiny_data[1], "labels.csv")
    _, val, method = split_samples(images, 0.25, seed=0, method="auto")
    assert method == "stratified"
    assert val.samples["label"].value_counts().to_dict() == {"cat": 2, "dog": 2, "fox": 2}


def test_validation_images_are_not_augmented_but_training_images_are(tiny_data):
    csv_path, root = tiny_data
    args = train.get_args_parser().parse_args(["--csv", str(csv_path), "--root", str(root), *FAST, "--cache", "off"])
    train.settle_defaults(args, torch.device("cpu"), checkpoint=None)  # as main's settle stage does
    train_set, val_set, _, class_names, _, _ = train.load_samples(args)
    train_data, val_data, _ = train.build_datasets(args, train_set, val_set, None, class_names, 36)
    ctx = devices.make_context(torch.device("cpu"), "off", presets.IMAGENET_MEAN, presets.IMAGENET_STD)
    train_loader, val_loader = train.build_dataloaders(args, train_data, val_data, ctx, workers=0)
    first_val = [batch[0] for batch in val_loader]
    second_val = [batch[0] for batch in val_loader]
    assert all(torch.equal(a, b) for a, b in zip(first_val, second_val))
    augment = train_loader.dataset.transform
    picture = load_image(root / train_set.samples["image"][0])
    views = [augment(picture) for _ in range(5)]
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_each_run_gets_a_fresh_directory(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv_path, root = tiny_data
    for _ in range(2):
        assert run_train("--csv", csv_path, "--root", root, *FAST, "--epochs", "1") == 0
    assert (tmp_path / "runs" / "exp1" / "best.pt").is_file()
    assert (tmp_path / "runs" / "exp2" / "best.pt").is_file()


def test_summary_line_per_epoch_and_best_at_the_end(train_tiny, capsys):
    status, run_dir = train_tiny("--epochs", "2")
    assert status == 0
    out = capsys.readouterr().out
    assert "epoch 1/2  train_loss" in out and "epoch 2/2  train_loss" in out
    assert f"{run_dir / 'best.pt'}" in out


@pytest.mark.parametrize(
    "labels, expected",
    [
        (["10", "2", "1"], ["1", "2", "10"]),
        (["b", "a", "C"], ["C", "a", "b"]),
    ],
)
def test_class_names_sort_numerically_when_integers_and_stay_text(labels, expected):
    assert sorted_class_names(labels) == expected


def test_an_earlier_run_in_the_output_dir_is_never_overwritten(train_tiny, capsys):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    before = (run_dir / "last.pt").read_bytes()
    assert train_tiny("--epochs", "1", output_dir=run_dir)[0] == 2
    assert "--resume" in capsys.readouterr().err
    assert (run_dir / "last.pt").read_bytes() == before


def test_validation_images_that_are_also_training_images_are_warned_about(train_tiny, tiny_data, tmp_path, capsys):
    rows = read_rows(tiny_data[0])
    val_csv = write_csv(tmp_path / "val.csv", [(r["image"], r["label"]) for r in rows[:6]])
    train_csv = write_csv(tmp_path / "train.csv", [(r["image"], r["label"]) for r in rows[3:]])
    status = run_train(
        "--csv",
        train_csv,
        "--root",
        tiny_data[1],
        "--val-csv",
        val_csv,
        *FAST,
        "--epochs",
        "1",
        "--output-dir",
        tmp_path / "run",
    )
    assert status == 0
    assert "3 of the 6 --val-csv images are also in --csv" in capsys.readouterr().err


def test_a_val_csv_of_training_images_only_is_refused_with_the_val_root_hint(train_tiny, tiny_data, capsys):
    status, run_dir = train_tiny("--epochs", "1", "--val-csv", tiny_data[0])
    assert status == 2
    assert "--val-root" in capsys.readouterr().err
    assert not (run_dir / "last.pt").exists()
