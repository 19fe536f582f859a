"""Where the model looks: Grad-CAM maps of predict.py --cam and the run folder's val_cam.jpg."""

import numpy as np
import pytest
import torch
import torchvision
from conftest import run_train, write_csv
from PIL import Image

import cam
import predict
from errors import UsageError

SIZE, PATCH = 146, 44  # the validation resize of --image-size 128 is 146: the images are used as they are


@pytest.fixture(scope="module")
def patch_task(tmp_path_factory):
    """48 noisy grey images whose class is the colour of a 44 px square at a random place (red or blue), with a
    green square elsewhere in every image (as salient, but no clue), and a resnet18 trained on them for 5
    epochs: (run folder, image folder, {image: (x, y)} of the deciding square). Measured: the trained model's
    map peaks inside the square for 0.88 of the images, the shuffled control's for 0.10."""
    folder = tmp_path_factory.mktemp("cam")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    rows, squares = [], {}
    for i in range(48):
        pixels = rng.integers(90, 150, (SIZE, SIZE, 3), dtype=np.uint8)
        while True:  # the square, and a green one as bright that both classes have, apart
            (x, y), (u, v) = (tuple(int(c) for c in rng.integers(20, SIZE - 20 - PATCH, 2)) for _ in range(2))
            if abs(x - u) > PATCH or abs(y - v) > PATCH:
                break
        pixels[v : v + PATCH, u : u + PATCH] = (40, 220, 40)
        pixels[y : y + PATCH, x : x + PATCH] = (220, 40, 40) if i % 2 else (40, 40, 220)
        Image.fromarray(pixels).save(folder / "images" / f"img{i:02d}.png")
        rows.append((f"img{i:02d}.png", "red" if i % 2 else "blue"))
        squares[f"img{i:02d}"] = (x, y)
    csv_path = write_csv(folder / "labels.csv", rows)
    argv = ["--csv", csv_path, "--root", folder / "images", "--model", "resnet18", "--image-size", "128"]
    argv += ["--batch-size", "16", "--epochs", "5", "--lr", "3e-4", "--best-metric", "loss", "--workers", "0"]
    assert run_train(*argv, "--device", "cpu", "--no-duplicate-check", "--output-dir", folder / "run") == 0
    return folder / "run", folder / "images", squares


def peaks_inside_the_square(checkpoint, images, squares, out):
    assert predict.run_cli([str(checkpoint), str(images), "--out", str(out / "p.csv"), "--cam", str(out)]) == 0
    inside = 0
    for name, (x, y) in squares.items():
        heat = np.asarray(Image.open(out / f"{name}_heat.png"))
        row, column = np.unravel_index(heat.argmax(), heat.shape)
        inside += x <= column < x + PATCH and y <= row < y + PATCH
    return inside / len(squares)


def test_the_heat_map_peaks_inside_the_square_that_decides_the_class(patch_task, tmp_path):
    run_dir, images, squares = patch_task
    trained = peaks_inside_the_square(run_dir / "best.pt", images, squares, tmp_path / "trained")
    # the control: the same weights, each tensor's values shuffled
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in checkpoint["model"].items():
        if tensor.is_floating_point() and "running_var" not in name:
            order = torch.randperm(tensor.numel(), generator=generator)
            checkpoint["model"][name] = tensor.flatten()[order].view_as(tensor)
    torch.save(checkpoint, tmp_path / "shuffled.pt")
    shuffled = peaks_inside_the_square(tmp_path / "shuffled.pt", images, squares, tmp_path / "shuffled")
    assert trained >= 0.6 and shuffled <= 0.3, (trained, shuffled)


def test_cam_files_overlay_the_crop_and_map_the_original_grid(patch_task, tmp_path):
    run_dir, images, _ = patch_task
    argv = [run_dir / "best.pt", images / "img00.png", "--out", tmp_path / "p.csv", "--cam", tmp_path / "cam"]
    assert predict.run_cli([str(a) for a in argv + ["--cam-class", "red"]]) == 0
    assert Image.open(tmp_path / "cam" / "img00_cam.jpg").size == (128, 128)  # the crop the model saw
    heat = Image.open(tmp_path / "cam" / "img00_heat.png")
    assert heat.mode == "L" and heat.size == (SIZE, SIZE)
    pixels = np.asarray(heat)
    border = (SIZE - 128) // 2  # the centre crop cut 9 pixels off each side: no heat there
    assert pixels[:border].max() == 0 and pixels[:, -border:].max() == 0 and pixels.max() == 255


def test_cam_on_an_onnx_model_is_one_error_line(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    argv = [tmp_path / "best.onnx", tmp_path / "a.png", "--cam", tmp_path / "cam"]
    assert predict.run_cli([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "--cam needs a .pt checkpoint" in err and err.count("\n") == 1


def test_the_target_layer_is_the_last_feature_map_before_pooling():
    resnet = torchvision.models.resnet18(num_classes=2)
    assert cam.target_layer(resnet, "resnet18", 64) is resnet.layer4
    vgg = torchvision.models.vgg11(num_classes=2)
    assert cam.target_layer(vgg, "vgg11", 64) is vgg.features  # not its 7x7 adaptive pooling
    with pytest.raises(UsageError, match="patch tokens"):  # decided by the name, before any forward pass
        cam.target_layer(torch.nn.Identity(), "vit_b_16", 224)


@pytest.mark.pictures
def test_a_run_draws_val_cam_jpg_beside_val_predictions_jpg(train_tiny):
    status, run_dir = train_tiny("--epochs", "1")
    assert status == 0
    with Image.open(run_dir / "val_cam.jpg") as picture:
        assert picture.size == Image.open(run_dir / "val_predictions.jpg").size


@pytest.mark.pictures
def test_a_map_that_cannot_be_drawn_is_one_warning_not_a_failure(tmp_path, capsys):
    model = torchvision.models.resnet18(num_classes=2)
    assert cam.draw_val_cam(model, "resnet18", None, None, None) is None  # no predictions to map
    assert capsys.readouterr().err.startswith("warning: could not draw val_cam.jpg (")
    assert not (tmp_path / "val_cam.jpg").exists()
