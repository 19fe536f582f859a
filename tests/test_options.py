"""Evaluation report, --evaluate, fine-tuning and the training options users ask for."""

import math

import pytest
import torch
import torchvision
from conftest import FAST, read_rows, run_train, write_csv

import devices
import models
import presets
import train


def options(*argv):
    return train.get_args_parser().parse_args([str(a) for a in argv])


def test_training_ends_with_a_report_and_confusion_matrix(train_tiny, capsys):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    report = {row["label"]: row for row in read_rows(run_dir / "report.csv")}
    assert {"cat", "dog", "fox", "macro avg", "weighted avg", "accuracy", "top2 accuracy"} <= report.keys()
    matrix = read_rows(run_dir / "confusion_matrix.csv")
    assert [row["true\\predicted"] for row in matrix] == ["cat", "dog", "fox"]
    assert sum(int(row[name]) for row in matrix for name in ("cat", "dog", "fox")) == int(report["accuracy"]["support"])
    assert "confusion matrix" in capsys.readouterr().out


def test_a_run_writes_every_validation_image_s_probabilities(train_tiny, capsys):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    rows = read_rows(run_dir / "val_predictions.csv")
    val_images = [row["image"] for row in read_rows(run_dir / "split.csv") if row["split"] == "val"]
    assert [row["image"] for row in rows] == val_images
    # and what the frozen operating point decides (multi-class: the classes at or above their thresholds)
    assert list(rows[0]) == ["image", "label", "predicted", "confidence", "p_cat", "p_dog", "p_fox", "decision"]
    for row in rows:
        probabilities = {name: float(row[f"p_{name}"]) for name in ("cat", "dog", "fox")}
        assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-4)
        assert row["predicted"] == max(probabilities, key=probabilities.get)
        assert float(row["confidence"]) == max(probabilities.values())
    report = {row["label"]: row for row in read_rows(run_dir / "report.csv")}
    correct = sum(row["label"] == row["predicted"] for row in rows)
    assert float(report["accuracy"]["value"]) == pytest.approx(correct / len(rows), abs=1e-6)
    assert {"specificity", "auc", "ci_low", "ci_high"} <= report["cat"].keys() and report["macro auc"]["value"]
    out = capsys.readouterr().out
    assert "(95% CI " in out and "macro AUC" in out and "specificity" in out
    assert "1 epoch ->" in out


def test_without_a_terminal_no_progress_bar_is_written(train_tiny, capsys):
    status, _ = train_tiny("--epochs", "1", "--cache", "on")  # captured output, as a log file: not a terminal
    assert status == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out and "epoch 1/1  train_loss" in captured.out


def test_evaluate_reproduces_the_end_of_training_report(train_tiny, tmp_path):
    status, run_dir = train_tiny("--epochs", "1", "--amp", "off")  # --evaluate is fp32 unless told otherwise
    assert status == 0
    assert run_train("--evaluate", run_dir / "best.pt", "--output-dir", tmp_path / "again") == 0
    assert (run_dir / "report.csv").read_text() == (tmp_path / "again" / "report.csv").read_text()
    assert (run_dir / "confusion_matrix.csv").read_text() == (tmp_path / "again" / "confusion_matrix.csv").read_text()


def test_evaluate_handles_classes_absent_from_the_data(train_tiny, tiny_data, tmp_path):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    only_cats = write_csv(tmp_path / "cats.csv", [(f"cat_{i}.png", "cat") for i in range(4)])
    assert (
        run_train(
            "--evaluate",
            run_dir / "best.pt",
            "--val-csv",
            only_cats,
            "--root",
            tiny_data[1],
            "--output-dir",
            tmp_path / "cats",
        )
        == 0
    )
    report = {row["label"]: row for row in read_rows(tmp_path / "cats" / "report.csv")}
    assert report["dog"]["support"] == "0" and report["dog"]["recall"] == report["dog"]["f1"] == ""  # undefined
    assert report["macro avg"]["support"] == "4"
    # only cats: no class has both positive and negative images, so no AUC; cat has no specificity either
    assert report["cat"]["auc"] == report["dog"]["auc"] == report["macro auc"]["value"] == ""
    assert report["cat"]["specificity"] == ""


def test_evaluate_refuses_labels_the_checkpoint_does_not_know(train_tiny, tiny_data, tmp_path, capsys):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    owls = write_csv(tmp_path / "owls.csv", [("cat_0.png", "owl")])
    assert run_train("--evaluate", run_dir / "best.pt", "--val-csv", owls, "--root", tiny_data[1]) == 2
    assert "owl" in capsys.readouterr().err


def test_metrics_record_macro_f1_per_epoch(train_tiny):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    assert 0.0 <= float(read_rows(run_dir / "metrics.csv")[0]["val_macro_f1"]) <= 1.0


def test_best_metric_loss_keeps_the_epoch_with_the_lowest_validation_loss(train_tiny):
    status, run_dir = train_tiny("--epochs", "3", "--best-metric", "loss", "--lr", "3e-3")
    assert status == 0
    rows = read_rows(run_dir / "metrics.csv")
    best_epoch = min(rows, key=lambda row: float(row["val_loss"]))["epoch"]
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == int(best_epoch)


def test_best_metric_auc_keeps_the_epoch_with_the_highest_macro_auc(train_tiny):
    status, run_dir = train_tiny("--epochs", "3", "--best-metric", "auc", "--lr", "3e-3")
    assert status == 0
    rows = read_rows(run_dir / "metrics.csv")
    best_epoch = max(rows, key=lambda row: float(row["val_auc"]))["epoch"]  # the first of equals, as training
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == int(best_epoch)


def test_patience_stops_early_and_leaves_consistent_checkpoints(train_tiny, capsys):
    status, run_dir = train_tiny("--epochs", "30", "--patience", "1", "--lr", "1e-7")
    assert status == 0
    last = torch.load(run_dir / "last.pt", weights_only=True)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert last["epoch"] < 30
    assert last["epoch"] - best["epoch"] == 1
    assert last["best"] == best["best"]
    assert "stopping early" in capsys.readouterr().out


def test_balanced_class_weights_are_inverse_frequency():
    loss_fn = train.build_loss(options("--class-weights", "balanced"), [0, 0, 0, 1], 2, torch.device("cpu"))
    assert torch.allclose(loss_fn.weight, torch.tensor([4 / 6, 4 / 2]))


def test_label_smoothing_reaches_the_loss():
    assert train.build_loss(options("--label-smoothing", "0.1"), [0, 1], 2, torch.device("cpu")).label_smoothing == 0.1


def test_balanced_sampler_draws_classes_about_equally(tiny_data, tmp_path):
    csv_path, root = tiny_data
    rows = [(f"cat_{i}.png", "cat") for i in range(8)] + [("dog_0.png", "dog"), ("dog_1.png", "dog")]
    skewed = write_csv(tmp_path / "skewed.csv", rows)
    args = options("--csv", skewed, "--root", root, *FAST, "--balanced-sampler", "--cache", "off", "--val-split", "0.2")
    train.settle_defaults(args, torch.device("cpu"), checkpoint=None)  # as main's settle stage does
    train_set, val_set, _, class_names, _, _ = train.load_samples(args)
    train_data, val_data, _ = train.build_datasets(args, train_set, val_set, None, class_names, 36)
    ctx = devices.make_context(torch.device("cpu"), "off", presets.IMAGENET_MEAN, presets.IMAGENET_STD)
    loader, _ = train.build_dataloaders(args, train_data, val_data, ctx, workers=0)
    drawn = [int(loader.dataset.targets[i]) for _ in range(50) for i in loader.sampler]
    assert 0.35 < sum(drawn) / len(drawn) < 0.65  # dogs are 1/4 of the training rows, half of the draws


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("none", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
        ("step", [0.5, 1.0, 1.0, 1.0, 0.1, 0.01]),
    ],
)
def test_learning_rate_schedules_with_warmup(schedule, expected):
    args = options("--lr-schedule", schedule, "--warmup-epochs", "1", "--epochs", "3", "--lr", "1")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = train.build_scheduler(optimizer, args, steps_per_epoch=2)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, abs=1e-6)


def test_weight_decay_skips_biases_and_norm_layers():
    model = torchvision.models.resnet18(num_classes=3)
    optimizer = train.build_optimizer(model, options("--weight-decay", "0.05", "--optimizer", "sgd"))
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and not_decayed["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in not_decayed["params"])


@pytest.mark.parametrize(
    "model_name", ["mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_y_400mf"]
)
def test_any_torchvision_model_gets_a_head_for_our_classes(model_name):
    model = models.build_model(model_name, 3).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_fine_tuning_from_a_local_resnet18_state_dict(train_tiny, tmp_path):
    pretrained = torchvision.models.resnet18()
    torch.save(pretrained.state_dict(), tmp_path / "resnet18.pth")
    model = models.build_model("resnet18", 3, weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.conv1.weight, pretrained.conv1.weight)
    assert model.fc.out_features == 3
    status, run_dir = train_tiny("--epochs", "1", "--weights", tmp_path / "resnet18.pth")
    assert status == 0


def test_freeze_backbone_trains_only_the_head(train_tiny, tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    status, run_dir = train_tiny("--epochs", "1", "--weights", tmp_path / "resnet18.pth", "--freeze-backbone")
    assert status == 0
    trained = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    start = torchvision.models.resnet18().state_dict() | torch.load(tmp_path / "resnet18.pth")
    assert torch.equal(trained["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])
    assert not torch.equal(trained["fc.weight"][:1], torch.zeros_like(trained["fc.weight"][:1]))


def test_validation_preprocessing_follows_the_pretrained_weights():
    mean, std, resize_size = presets.weights_preprocessing("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 384)
    preset = torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1.transforms()
    assert (mean, std) == (tuple(preset.mean), tuple(preset.std))
    assert resize_size == preset.resize_size[0]
