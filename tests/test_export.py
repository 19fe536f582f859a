"""export.py: ONNX and .pt2 files that compute what the checkpoint computes, carry its classes and preprocessing,
work with predict.py, and refuse mistakes in one line."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import FAST, make_image, read_rows, run_train, write_csv
from PIL import Image

import devices
import export
import models
import predict

CLASSES = ["cat", "dog", "fox"]
README = Path(__file__).resolve().parents[1] / "README.md"


def run_export(*argv):
    return export.run_cli([str(a) for a in argv])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny trained run, exported once to ONNX and once to .pt2 (the slow part, shared by the tests):
    (run directory, images folder, the two check lines export.py printed)."""
    base = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    root = base / "images"
    root.mkdir()
    rows = []
    for label_index, label in enumerate(CLASSES):
        for i in range(8):
            make_image(root / f"{label}_{i}.png", label_index, rng)
            rows.append((f"{label}_{i}.png", label))
    # Images of other shapes, not trained on, for the resize and crop of predict.py and the README's code: a JPEG
    # large enough for draft decoding and Image.reduce, and a small PNG.
    Image.fromarray(rng.integers(0, 256, (240, 330, 3), dtype=np.uint8)).save(root / "big.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)).save(root / "wide.png")
    csv_path = write_csv(base / "labels.csv", rows)
    run_dir = base / "run"
    assert run_train("--csv", csv_path, "--root", root, "--output-dir", run_dir, *FAST, "--epochs", "1") == 0
    checks = {}
    for fmt in ("onnx", "pt2"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert run_export(run_dir / "best.pt", "--format", fmt) == 0
        checks[fmt] = printed.getvalue()
    return run_dir, root, checks


def pytorch_model(checkpoint_path):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    ctx = devices.make_context(torch.device("cpu"), "off", checkpoint["mean"], checkpoint["std"])
    return models.model_from_checkpoint(checkpoint, "test", ctx), checkpoint


def test_export_prints_its_check_and_writes_beside_the_checkpoint(exported):
    run_dir, _, checks = exported
    for fmt, ext in (("onnx", ".onnx"), ("pt2", ".pt2")):
        match = re.search(r"largest relative difference (\S+) \(limit 0\.001\)", checks[fmt])
        assert match and float(match.group(1)) < 1e-4, checks[fmt]
        assert f"wrote {run_dir / ('best' + ext)}" in checks[fmt]
        assert "[torch.onnx]" not in checks[fmt]  # the exporter's progress lines are kept out of the way
    assert not list(run_dir.glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnx_matches_pytorch_on_any_batch_size(exported, batch_size):
    run_dir, _, _ = exported
    model, checkpoint = pytorch_model(run_dir / "best.pt")
    session = onnxruntime.InferenceSession(str(run_dir / "best.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(batch_size))
    batch = (images - torch.tensor(checkpoint["mean"]).view(1, 3, 1, 1)) / torch.tensor(checkpoint["std"]).view(
        1, 3, 1, 1
    )
    (logits,) = session.run(["logits"], {"images": batch.numpy()})
    with torch.inference_mode():
        expected = model(batch).numpy()
    assert logits.shape == (batch_size, len(CLASSES))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_onnx_metadata_holds_classes_and_preprocessing_and_the_batch_axis_is_dynamic(exported):
    run_dir, _, _ = exported
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    model = onnx.load(run_dir / "best.onnx")
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["classifier"])
    assert meta["class_names"] == CLASSES
    assert meta["image_size"] == 32 and meta["resize_size"] == checkpoint["resize_size"] == 36
    assert meta["mean"] == pytest.approx(checkpoint["mean"]) and meta["std"] == pytest.approx(checkpoint["std"])
    assert meta["model_name"] == "resnet18" and (meta["input"], meta["output"]) == ("images", "logits")

    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "images"
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # a named, free batch axis
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_pt2_loads_back_with_its_metadata_and_matches(exported):
    run_dir, _, _ = exported
    model, checkpoint = pytorch_model(run_dir / "best.pt")
    extra = {"classifier.json": ""}
    program = torch.export.load(run_dir / "best.pt2", extra_files=extra)
    assert json.loads(extra["classifier.json"])["class_names"] == CLASSES
    for batch_size in (1, 4):
        batch = torch.randn(batch_size, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(program.module()(batch), model(batch), rtol=1e-5, atol=1e-6)


def test_predict_gives_the_same_labels_and_confidences_from_best_pt_and_onnx(exported, tmp_path):
    run_dir, root, _ = exported
    results = {}
    for name in ("best.pt", "best.onnx"):
        out = tmp_path / f"{name}.csv"
        # predict's default precision: fp32 for best.pt too, also on a CPU where train.py's autocast is bf16
        argv = [run_dir / name, root, "--out", out, "--topk", "2", "--workers", "0", "--device", "cpu"]
        assert predict.run_cli([str(a) for a in argv]) == 0
        results[name] = read_rows(out)
    from_pt, from_onnx = results["best.pt"], results["best.onnx"]
    assert list(from_pt[0]) == list(from_onnx[0])
    assert [r["image"] for r in from_pt] == [r["image"] for r in from_onnx] and len(from_pt) == 26
    for a, b in zip(from_pt, from_onnx):
        assert (a["label"], a["top2_label"]) == (b["label"], b["top2_label"])
        for column in ["confidence", "top2_confidence", *CLASSES]:
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-4)


def test_readme_snippet_classifies_like_predict(exported, tmp_path, monkeypatch, capsys):
    """The Deploy section's onnxruntime + numpy + Pillow code gives predict.py's label and confidence."""
    run_dir, root, _ = exported
    section = README.read_text().split("## Deploy", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    out = tmp_path / "pred.csv"
    images = [root / "big.jpg", root / "wide.png", root / "dog_3.png"]
    argv = [run_dir / "best.onnx", *images, "--out", out, "--workers", "0"]
    assert predict.run_cli([str(a) for a in argv]) == 0
    for row in read_rows(out):
        capsys.readouterr()
        code = snippet.replace("runs/exp1/best.onnx", str(run_dir / "best.onnx")).replace("scan.png", row["image"])
        exec(compile(code, "README.md", "exec"), {})
        label, confidence = capsys.readouterr().out.split()
        assert label == row["label"]
        assert float(confidence) == pytest.approx(float(row["confidence"]), abs=1e-5)


@pytest.mark.parametrize(
    "mistake", ["state_dict", "not_a_file", "unknown_format", "under_a_file", "no_folder", "format_and_name"]
)
def test_user_mistakes_exit_2_with_one_line(mistake, exported, tmp_path, capsys):
    run_dir, _, _ = exported
    checkpoint, extra = run_dir / "best.pt", []
    if mistake == "state_dict":
        checkpoint = tmp_path / "resnet18.pt"
        torch.save(models.build_model("resnet18", 3).state_dict(), checkpoint)
    elif mistake == "not_a_file":
        checkpoint = tmp_path / "notes.pt"
        checkpoint.write_text("hello")
    elif mistake == "unknown_format":
        extra = ["--format", "tflite"]
    elif mistake == "under_a_file":
        (tmp_path / "plain").write_text("a file, not a folder")
        extra = ["--out", tmp_path / "plain" / "model.onnx"]
    elif mistake == "no_folder":
        extra = ["--out", tmp_path / "missing" / "model.onnx"]
    else:
        extra = ["--format", "pt2", "--out", tmp_path / "model.onnx"]
    assert run_export(checkpoint, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    expected = {
        "state_dict": "not a checkpoint written by train.py",
        "not_a_file": "not a PyTorch checkpoint",
        "unknown_format": "invalid choice: 'tflite'",
        "under_a_file": "is not a folder",
        "no_folder": "no such folder",
        "format_and_name": "a .onnx name for --format pt2",
    }[mistake]
    assert expected in err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.pt2"))


def test_a_failed_self_check_writes_nothing_and_exits_1(exported, tmp_path, monkeypatch, capsys):
    """When ONNX Runtime disagrees with PyTorch, the file is not left where a deployment would pick it up."""
    run_dir, _, _ = exported
    real_run_onnx = export.run_onnx

    def wrong_by_one_percent(path):
        run = real_run_onnx(path)
        return lambda batch: run(batch) * 1.01

    # A real export would take the time the fixture already spent: copy its checked file in instead.
    monkeypatch.setattr(
        export, "export_onnx", lambda model, example, path, meta: shutil.copy(run_dir / "best.onnx", path)
    )
    monkeypatch.setattr(export, "run_onnx", wrong_by_one_percent)
    out = tmp_path / "model.onnx"
    assert run_export(run_dir / "best.pt", "--out", out) == 1
    captured = capsys.readouterr()
    assert re.search(r"largest relative difference 0\.01 ", captured.out), captured.out
    assert captured.err.startswith("error: the exported model differs") and len(captured.err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the file nor the temporary folder


def test_predict_refuses_an_onnx_model_without_our_metadata(tiny_data, tmp_path, capsys):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "plain.onnx")
    (tmp_path / "broken.onnx").write_text("not a model")
    for name, expected in (("plain.onnx", "no classes or preprocessing"), ("broken.onnx", "not an ONNX model")):
        argv = [tmp_path / name, tiny_data[1], "--out", tmp_path / "pred.csv"]
        assert predict.run_cli([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: checkpoint") and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "pred.csv").exists()
