"""The run folder's pictures (plots.py): each is a real image of a sensible size, class
names no font has fall back to numbers with a warning, and a failing picture is one warning line, never an
exception. The last tests go through train.py: they pass once train.py calls the draw_* functions."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import read_rows
from PIL import Image

import devices
import metrics
import plots
import presets
import report
import run_files
import train

pytestmark = pytest.mark.pictures

NAMES = ["cat", "dog", "fox"]
CHINESE = ["猫", "狗", "狐狸"]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test starts with no warning printed yet (plots prints each one once per process)."""
    monkeypatch.setattr(plots, "_warned", set())


def history(epochs):
    return [
        dict(
            epoch=e,
            train_loss=1 / e,
            train_acc=1 - 0.4 / e,
            val_loss=1.1 / e,
            val_acc=1 - 0.5 / e,
            lr=1e-4 * 0.5 ** (e - 1),
            seconds=12.5,
            val_macro_f1=1 - 0.6 / e,
        )
        for e in range(1, epochs + 1)
    ]


def open_image(path, image_format, min_size, max_size):
    """The image at `path`, checked to be a complete `image_format` file within the size bounds and not blank."""
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == image_format
    assert min_size[0] <= image.width <= max_size[0] and min_size[1] <= image.height <= max_size[1], image.size
    darkest, lightest = image.convert("L").getextrema()
    assert darkest < lightest, "a blank picture"
    return image


def some_images(count, size=32, seed=0):
    return torch.randint(
        0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------------------ each picture


def test_results_png_after_several_epochs(tmp_path):
    assert report.save_picture(tmp_path, plots.draw_results(history(5))) is True
    open_image(tmp_path / "results.png", "PNG", (600, 400), (1600, 1200))


def test_results_png_after_one_epoch(tmp_path):
    assert report.save_picture(tmp_path, plots.draw_results(history(1))) is True
    open_image(tmp_path / "results.png", "PNG", (600, 400), (1600, 1200))


def test_results_png_from_metrics_csv_text(tmp_path):
    """Rows read back from metrics.csv hold text, and an older run's rows may lack val_macro_f1."""
    report.write_metrics(tmp_path, history(3))
    rows = read_rows(tmp_path / "metrics.csv")
    rows[0]["val_macro_f1"] = ""
    assert report.save_picture(tmp_path, plots.draw_results(rows)) is True
    open_image(tmp_path / "results.png", "PNG", (600, 400), (1600, 1200))


def test_results_png_is_redrawn(tmp_path):
    report.save_picture(tmp_path, plots.draw_results(history(2)))
    first = (tmp_path / "results.png").read_bytes()
    report.save_picture(tmp_path, plots.draw_results(history(4)))
    assert (tmp_path / "results.png").read_bytes() != first


def test_confusion_matrix_for_3_classes(tmp_path):
    confusion = torch.tensor([[7, 1, 0], [0, 8, 0], [2, 0, 6]])
    assert report.save_picture(tmp_path, plots.draw_confusion_matrix(confusion, NAMES)) is True
    open_image(tmp_path / "confusion_matrix.png", "PNG", (600, 300), (1600, 1000))


def test_confusion_matrix_of_the_test_set_has_its_prefix(tmp_path):
    report.save_picture(tmp_path, plots.draw_confusion_matrix(torch.eye(3, dtype=torch.long), NAMES, prefix="test_"))
    assert (tmp_path / "test_confusion_matrix.png").is_file()
    assert not (tmp_path / "confusion_matrix.png").exists()


def test_confusion_matrix_3_classes_has_cell_text_and_every_name():
    figure = plots._confusion_figure(torch.tensor([[7, 1, 0], [0, 8, 0], [2, 0, 6]]), NAMES, "validation")
    counts = figure.axes[0]
    assert sorted(t.get_text() for t in counts.texts) == ["1", "2", "6", "7", "8"]  # zero cells stay blank
    assert [t.get_text() for t in counts.get_xticklabels()] == NAMES


def test_confusion_matrix_for_300_classes(tmp_path):
    confusion = torch.randint(0, 3, (300, 300), generator=torch.Generator().manual_seed(0)) + 20 * torch.eye(300).long()
    names = [f"species_{i}" for i in range(300)]
    assert report.save_picture(tmp_path, plots.draw_confusion_matrix(confusion, names)) is True
    open_image(tmp_path / "confusion_matrix.png", "PNG", (1000, 600), (3200, 1800))


def test_confusion_matrix_300_classes_has_no_cell_text_and_thinned_ticks():
    confusion = torch.ones(300, 300, dtype=torch.long)
    figure = plots._confusion_figure(confusion, [f"species_{i}" for i in range(300)], "validation")
    for ax in figure.axes[:2]:  # the two matrices; then come their colour bars
        assert not ax.texts
        assert 10 <= len(ax.get_xticks()) <= 40


def test_roc_png_draws_each_class_with_its_auc_in_the_legend(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2] * 10)
    logits = torch.randn(30, 3, generator=generator) + 2 * torch.nn.functional.one_hot(labels, 3)
    predictions = metrics.Predictions(torch.arange(30), labels, logits.log_softmax(1))
    curves, aucs = metrics.roc_curves(predictions), metrics.class_scores(predictions)["auc"]
    assert report.save_picture(tmp_path, plots.draw_roc(curves, aucs, NAMES)) is True
    open_image(tmp_path / "roc.png", "PNG", (500, 450), (900, 800))
    legend = [t.get_text() for t in plots._roc_figure(curves, aucs, NAMES, "validation").axes[0].get_legend().texts]
    assert legend[1:] == [f"{name} (AUC {auc:.3f})" for name, auc in zip(NAMES, aucs)]


def test_roc_png_draws_at_most_20_classes_and_names_the_rest():
    labels = torch.arange(25).repeat(2)
    predictions = metrics.Predictions(torch.arange(50), labels, torch.randn(50, 25).log_softmax(1))
    names = [f"c{i}" for i in range(25)]
    figure = plots._roc_figure(metrics.roc_curves(predictions), [0.5] * 25, names, "validation")
    assert len(figure.axes[0].get_legend().texts) == 1 + 20  # the chance line, then 20 classes
    assert any("not drawn (5): c20, c21" in t.get_text() for t in figure.texts)


def test_calibration_png_shows_the_bins_and_the_ece(tmp_path):
    labels = torch.tensor([0, 1] * 20)
    predictions = metrics.Predictions(torch.arange(40), labels, torch.randn(40, 2).log_softmax(1))
    bins = metrics.calibration_bins(predictions)
    assert report.save_picture(tmp_path, plots.draw_calibration(bins, 0.123, prefix="test_")) is True
    open_image(tmp_path / "test_calibration.png", "PNG", (500, 500), (900, 900))
    figure = plots._calibration_figure(bins, 0.123, "test")
    assert "ECE 0.123" in figure.axes[0].get_title()
    assert sorted(int(t.get_text()) for t in figure.axes[1].texts) == sorted(n for n in bins["count"] if n)


def test_val_predictions_jpg(tmp_path):
    true = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    predicted = torch.tensor([0, 2, 2, 1, 1, 2, 0, 0, 2, 0])
    confidence = torch.linspace(0.4, 0.99, 10)
    assert (
        report.save_picture(tmp_path, plots.draw_predictions(some_images(10), true, predicted, confidence, NAMES))
        is True
    )
    # 10 images: a row of 8 and a row of 2, ~140 px per cell
    open_image(tmp_path / "val_predictions.jpg", "JPEG", (8 * 120, 2 * 140), (8 * 160, 2 * 200))


def test_val_predictions_shows_at_most_max_images(tmp_path):
    count = 40
    labels = torch.zeros(count, dtype=torch.long)
    report.save_picture(
        tmp_path, plots.draw_predictions(some_images(count), labels, labels, torch.rand(count), NAMES, max_images=16)
    )
    assert Image.open(tmp_path / "val_predictions.jpg").height < 3 * 200  # 2 rows of 8, not 5


def test_prediction_order_mistakes_first_most_confident_first():
    true = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 0, 2, 0])
    confidence = torch.tensor([0.9, 0.6, 0.5, 0.95, 0.7, 0.8])
    # mistakes 3 (0.95), 5 (0.8), 1 (0.6); then right answers, least confident first: 2 (0.5), 4 (0.7), 0 (0.9)
    assert plots.prediction_order(true, predicted, confidence) == [3, 5, 1, 2, 4, 0]


def test_train_batch_jpg(tmp_path):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    assert report.save_picture(tmp_path, plots.draw_batch(some_images(16, size=48), labels, NAMES)) is True
    open_image(tmp_path / "train_batch.jpg", "JPEG", (8 * 120, 2 * 130), (8 * 160, 2 * 200))


def test_args_json_holds_every_flag_and_the_machine_choices(tmp_path):
    args = train.get_args_parser().parse_args(["--csv", "数据/labels.csv", "--batch-size", "8", "--accum-steps", "2"])
    ctx = devices.make_context(torch.device("cpu"), "off", presets.IMAGENET_MEAN, presets.IMAGENET_STD)
    run_files.write_args(tmp_path, args, ctx, workers=0)
    text = (tmp_path / "args.json").read_text(encoding="utf-8")
    assert "数据" in text  # readable, not \\u escapes
    settings = json.loads(text)
    resolved = {"device", "workers"}  # the flags' auto values are written as what the run chose
    assert {k: settings[k] for k in vars(args) if k not in resolved} == {
        k: v for k, v in vars(args).items() if k not in resolved
    }
    assert settings["device"] == "cpu" and settings["precision"] == "fp32" and settings["global_batch"] == 16
    assert settings["workers"] == 0
    assert settings["torch"] == torch.__version__


# ----------------------------------------------------------------------------------- fonts and failures


def installed_font_has(text):
    """Whether a font matplotlib knows (other than its Last Resort boxes) has every character of `text`."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    needed = {ord(c) for c in text}
    for font in font_manager.fontManager.ttflist:
        if not font.name.startswith("Last Resort"):
            try:
                needed -= set(FT2Font(font.fname).get_charmap())
            except Exception:
                pass
    return not needed


def test_chinese_class_names_are_drawn_or_fall_back_to_numbers_with_a_warning(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.save_picture(tmp_path, plots.draw_confusion_matrix(torch.eye(3, dtype=torch.long), CHINESE))
    assert not [w for w in caught if "missing from font" in str(w.message)], "Chinese names drawn as empty boxes"
    assert (tmp_path / "confusion_matrix.png").is_file()
    err = capsys.readouterr().err
    if installed_font_has("".join(CHINESE)):
        assert "no installed font" not in err
    else:
        assert err.count("\n") == 1 and "pictures show class numbers" in err and "key: 0=猫, 1=狗, 2=狐狸" in err


def test_class_names_no_font_has_become_numbers(monkeypatch):
    monkeypatch.setattr(plots, "_characters_of", lambda font_path: frozenset(range(128)))  # fonts: ASCII only
    assert plots._class_labels(["café", "dog"]) == (["DejaVu Sans"], ["0", "1"])


def test_font_warning_is_printed_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plots, "_fonts_for", lambda text: None)
    report.save_picture(tmp_path, plots.draw_confusion_matrix(torch.eye(3, dtype=torch.long), CHINESE))
    report.save_picture(tmp_path, plots.draw_results(history(2)))
    report.save_picture(tmp_path, plots.draw_batch(some_images(3), torch.tensor([0, 1, 2]), CHINESE))
    assert capsys.readouterr().err.count("pictures show class numbers") == 1


def test_latin_and_greek_names_keep_dejavu_sans():
    assert plots._class_labels(["café", "Ωmega", "naïve"]) == (["DejaVu Sans"], ["café", "Ωmega", "naïve"])


def test_a_broken_plotting_call_is_one_warning_line(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def broken(*args, **kwargs):
        raise RuntimeError("no room on the canvas\nsecond line")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    assert report.save_picture(tmp_path, plots.draw_results(history(2))) is False
    assert capsys.readouterr().err == "warning: could not draw results.png (RuntimeError: no room on the canvas)\n"
    assert list(tmp_path.iterdir()) == []  # no picture, no temporary file


def test_a_failing_picture_warns_once_not_every_epoch(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: 1 / 0)
    for epochs in range(1, 4):
        report.save_picture(tmp_path, plots.draw_results(history(epochs)))
    assert capsys.readouterr().err.count("could not draw results.png") == 1


def test_without_matplotlib_drawing_is_a_warning(tmp_path, capsys, monkeypatch):
    for module in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.save_picture(tmp_path, plots.draw_confusion_matrix(torch.eye(3, dtype=torch.long), NAMES)) is False
    assert capsys.readouterr().err.startswith("warning: could not draw confusion_matrix.png (ModuleNotFoundError")


def test_importing_run_files_plots_and_metrics_imports_neither_matplotlib_nor_torchmetrics():
    code = "import sys, run_files, plots, metrics; print('matplotlib' in sys.modules, 'torchmetrics' in sys.modules)"
    here = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"  # predict.py and export.py start fast


# ------------------------------------------------------------------------------------ through train.py
# These need train.py to call plots.draw_results after every epoch (rank 0); they fail until it does.


def test_train_writes_results_png_and_redraws_it_on_resume(train_tiny, monkeypatch):
    status, run = train_tiny("--epochs", "1")
    assert status == 0
    first = open_image(run / "results.png", "PNG", (600, 400), (1600, 1200)).tobytes()
    drawn = []
    draw_results = plots.draw_results
    monkeypatch.setattr(plots, "draw_results", lambda h: drawn.append(len(h)) or draw_results(h))
    status, _ = train_tiny("--epochs", "2", "--resume")
    assert status == 0
    assert drawn == [2]  # the whole history, the epoch before the resume included
    assert open_image(run / "results.png", "PNG", (600, 400), (1600, 1200)).tobytes() != first


def test_a_run_draws_roc_and_calibration_of_validation_and_test(train_tiny, tiny_data, tmp_path):
    csv_path, root = tiny_data
    status, run = train_tiny("--epochs", "1", "--test-csv", csv_path, "--test-root", root)
    assert status == 0
    for name in ("roc.png", "calibration.png", "test_roc.png", "test_calibration.png"):
        open_image(run / name, "PNG", (500, 450), (900, 900))
    assert len(read_rows(run / "test_predictions.csv")) == 24


def test_training_survives_a_broken_plot(train_tiny, capsys, monkeypatch):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: 1 / 0)
    status, run = train_tiny("--epochs", "1")
    assert status == 0
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file() and (run / "metrics.csv").is_file()
    assert not (run / "results.png").exists()
    assert "warning: could not draw results.png (ZeroDivisionError" in capsys.readouterr().err
