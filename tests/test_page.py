"""report.html in a real browser, methods.md from the run's own settings, and the optional trackers."""

import html
import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import FAST, read_rows, run_train
from PIL import Image

import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags the machine's notes give for headless Chromium as root on a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

# A page beside report.html that loads it in a frame and writes what the browser made of it: each image loaded
# and not blank (its pixels drawn on a canvas vary), and the rows of every table with an id.
PROBE = """<!doctype html><html><body><iframe id="page" src="report.html" width="1200" height="4000"></iframe>
<pre id="result">pending</pre><script>
document.getElementById("page").onload = () => {
  const page = document.getElementById("page").contentDocument, images = Array.from(page.images);
  const blank = image => { const canvas = document.createElement("canvas");
    canvas.width = Math.min(image.naturalWidth, 200); canvas.height = Math.min(image.naturalHeight, 200);
    const context = canvas.getContext("2d"); context.drawImage(image, 0, 0, canvas.width, canvas.height);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 4; i < pixels.length; i += 4) if (pixels[i] !== pixels[0]) return false;
    return true; };
  const result = {images: images.length, tables: {},
                  loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
                  blank: images.filter(i => i.naturalWidth > 0 && blank(i)).map(i => i.alt)};
  page.querySelectorAll("table[id]").forEach(
    t => result.tables[t.id] = t.tBodies.length ? t.tBodies[0].rows.length : 0);
  document.getElementById("result").textContent = JSON.stringify(result);
};
</script></body></html>"""


@pytest.fixture(scope="module")
def drawn_run(tmp_path_factory):
    """A tiny run with a test CSV whose pictures are drawn (the `pictures` marker's way, for the whole module)."""
    import numpy as np
    from conftest import make_image, write_csv

    base = tmp_path_factory.mktemp("page")
    rng = np.random.default_rng(0)
    root = base / "images"
    root.mkdir()
    rows = []
    for label_index, label in enumerate(["cat", "dog", "fox"]):
        for i in range(10):
            make_image(root / f"{label}_{i}.png", label_index, rng)
            rows.append((f"{label}_{i}.png", label))
    csv_path = write_csv(base / "labels.csv", rows[::2] + rows[1::2][:9])
    test_csv = write_csv(base / "test.csv", rows[1::2][9:])
    run_dir = base / "run"
    flags = ["--epochs", "2", "--test-csv", test_csv, "--output-dir", run_dir]
    assert run_train("--csv", csv_path, "--root", root, *FAST, *flags) == 0
    return run_dir


@pytest.mark.pictures
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_opens_in_chromium_with_every_picture_and_table_row(drawn_run, tmp_path):
    (drawn_run / "probe.html").write_text(PROBE)
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files"]
    probe = [*command, "--virtual-time-budget=10000", "--dump-dom", (drawn_run / "probe.html").as_uri()]
    dumped = subprocess.run(probe, capture_output=True, text=True, timeout=120).stdout
    (drawn_run / "probe.html").unlink()
    result = json.loads(html.unescape(re.search(r'<pre id="result">(.*?)</pre>', dumped, re.S).group(1)))
    pictures = [p for p in drawn_run.iterdir() if p.suffix in (".png", ".jpg") and p.name != "lr_find.png"]
    assert result["images"] == len(pictures) >= 8  # every picture of the folder is on the page
    assert result["loaded"] == result["images"] and result["blank"] == []
    report_rows = read_rows(drawn_run / "report.csv")
    classes = [row for row in report_rows if row["value"] == ""]
    assert result["tables"]["validation-table"] == len(classes)
    assert result["tables"]["validation-summary"] == len(report_rows) - len(classes)
    assert result["tables"]["test-table"] == len(
        [r for r in read_rows(drawn_run / "test_report.csv") if r["value"] == ""]
    )
    assert result["tables"]["epochs-table"] == len(read_rows(drawn_run / "metrics.csv")) == 2
    assert result["tables"]["files-table"] == len([p for p in drawn_run.iterdir() if p.is_file()])

    screenshot = tmp_path / "page.png"
    subprocess.run([*command, "--window-size=1200,2000", f"--screenshot={screenshot}",
                    (drawn_run / "report.html").as_uri()], capture_output=True, timeout=120)  # fmt: skip
    with Image.open(screenshot) as image:
        colours = image.convert("L").getextrema()
    assert colours[1] - colours[0] > 100  # text and pictures, not a blank page


def test_the_page_is_self_contained(drawn_run):
    page = (drawn_run / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # no internet needed
    assert page.count('src="data:image/') == page.count("<img ")
    assert "optimistic" in page and "honest" in page


def fake_run(folder, **settings):
    """A run folder as report.methods_context reads it: args.json, split.csv, metrics.csv and report.csv."""
    folder.mkdir(exist_ok=True)
    args = {"csv": "labels.csv", "model": "resnet34", "weights": None, "image_size": 224, "epochs": 3,
            "batch_size": 16, "global_batch": 16, "optimizer": "adam", "lr": 0.0001, "weight_decay": 0.0,
            "lr_schedule": "none", "label_smoothing": 0.0, "augment": "basic", "crop_scale": 0.08, "mixup": 0.0,
            "cutmix": 0.0, "best_metric": "acc", "calibrate": True, "operating_point": "youden", "seed": 0,
            "device": "cpu", "precision": "fp32", "torch": "2.14.1", "torchvision": "0.29.1",
            "split_method": "stratified split", **settings}  # fmt: skip
    (folder / "args.json").write_text(json.dumps(args))
    split = [f"{i}.png,{'ab'[i % 2]},{'train' if i < 14 else 'val'}," for i in range(20)]
    (folder / "split.csv").write_text("image,label,split,group\n" + "\n".join(split) + "\n")
    (folder / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n3,0.3\n")
    (folder / "report.csv").write_text(
        "label,support,value,ci_low,ci_high\naccuracy,6,0.833333,0.436497,0.969947\nmacro auc,6,0.9,0.7,1\n"
        "temperature,6,1.5,,\n"
    )
    return folder


@pytest.mark.parametrize(
    "setting, before, after",
    [
        ({"lr": 0.003}, "learning rate 0.0001", "learning rate 0.003"),
        ({"optimizer": "sgd"}, "with Adam", "with SGD with momentum"),
        ({"weights": "IMAGENET1K_V1"}, "initialised at random", "pretrained weights IMAGENET1K_V1"),
        ({"lr_schedule": "cosine"}, "a constant learning rate", "a cosine schedule"),
        ({"label_smoothing": 0.1}, "cross-entropy loss, in", "with label smoothing 0.1"),
        ({"group_col": "patient"}, "in 2 classes", "grouped by patient"),
        ({"best_metric": "auc"}, "best validation accuracy", "best validation macro AUC"),
        ({"operating_point": "sens=0.95"}, "(youden operating point", "(sens=0.95 operating point"),
    ],
)
def test_each_methods_sentence_follows_the_run_s_settings(setting, before, after, tmp_path):
    default = (tmp_path / "a").mkdir() or report.methods_context(fake_run(tmp_path / "a"))
    changed = report.methods_context(fake_run(tmp_path / "b", **setting))
    default_text, changed_text = " ".join(default.values()), " ".join(changed.values())
    assert before in default_text and after not in default_text
    assert after in changed_text


def test_methods_numbers_are_those_of_args_json_and_report_csv(drawn_run):
    text = (drawn_run / "methods.md").read_text()
    args = json.loads((drawn_run / "args.json").read_text())
    assert f"learning rate {args['lr']}" in text and f"batch size {args['global_batch']}" in text
    assert f"{args['image_size']} x {args['image_size']} pixels" in text and f"seed {args['seed']}" in text
    split = read_rows(drawn_run / "split.csv")
    assert f"We used {len(split)} images" in text
    assert f"A test set of {sum(r['split'] == 'test' for r in split)} images" in text
    for part, name in (("validation", "report.csv"), ("test", "test_report.csv")):
        accuracy = {row["label"]: row for row in read_rows(drawn_run / name)}["accuracy"]
        low, high = (float(accuracy[k]) for k in ("ci_low", "ci_high"))
        assert f"On the {part} set ({accuracy['support']} images) the model reached accuracy " \
               f"{float(accuracy['value']):.3f} ({low:.3f}-{high:.3f})" in text  # fmt: skip
    temperature = {row["label"]: row for row in read_rows(drawn_run / "report.csv")}["temperature"]["value"]
    assert f"T = {float(temperature):.3f}" in text
    assert f"{len(read_rows(drawn_run / 'metrics.csv'))} epochs" in text


def test_tensorboard_events_hold_metrics_csv_s_values(train_tiny):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    status, run_dir = train_tiny("--epochs", "2", "--tensorboard")
    assert status == 0
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for row in read_rows(run_dir / "metrics.csv"):
        for name in ("train_loss", "val_loss", "val_acc", "val_auc", "lr"):
            logged = {e.step: e.value for e in events.Scalars(name)}
            assert logged[int(row["epoch"])] == pytest.approx(float(row[name]), rel=1e-5)


def test_mlflow_logs_the_epochs_when_installed(train_tiny, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # a file store: mlflow-skinny has it
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    status, run_dir = train_tiny("--epochs", "1", "--mlflow")
    assert status == 0
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    logged = float(read_rows(run_dir / "metrics.csv")[0]["val_acc"])  # metrics.csv holds 6 significant digits
    assert run.data.metrics["val_acc"] == pytest.approx(logged, rel=1e-5)


def test_a_tracker_that_is_not_installed_says_how_to_install_it(train_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    for flag, package in (("--tensorboard", "tensorboard"), ("--mlflow", "mlflow")):
        status, run_dir = train_tiny("--epochs", "1", flag, output_dir=tmp_path / package)
        assert status == 2
        err = capsys.readouterr().err
        assert f"{flag} needs the {package} package: pip install {package}" in err and err.count("\n") == 1
        assert not (run_dir / "args.json").exists()  # stopped before the run folder was written


def test_the_page_is_rewritten_after_each_epoch_saying_how_far_the_run_is(tmp_path):
    folder = fake_run(tmp_path / "run")
    report.epoch_done(folder, [{"epoch": 1, "train_loss": 0.5}])
    page = (folder / "report.html").read_text()
    assert "after epoch 1" in page
    report.epoch_done(folder, [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}])
    assert "after epoch 2" in (folder / "report.html").read_text()


def test_the_page_says_how_the_images_were_grouped_and_whether_a_group_leaks(tmp_path):
    folder = fake_run(tmp_path / "run", group_col="patient")
    rows = [f"{i}.png,{'ab'[i % 2]},{'train' if i < 14 else 'val'},P{i // 2}" for i in range(20)]
    (folder / "split.csv").write_text("image,label,split,group\n" + "\n".join(rows) + "\n")
    report.write_page(folder)
    page = (folder / "report.html").read_text()
    assert "grouped by patient: 7 groups in train, 3 groups in val; no group is in two parts" in page
    rows[13] = "13.png,b,train,P7"  # patient P7 now has images in train and val
    (folder / "split.csv").write_text("image,label,split,group\n" + "\n".join(rows) + "\n")
    report.write_page(folder)
    assert "1 group is in two parts: its images leak" in (folder / "report.html").read_text()
