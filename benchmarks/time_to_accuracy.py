"""Time to accuracy: whole `python train.py` runs of several configurations on one synthetic dataset.

    python benchmarks/time_to_accuracy.py                      # every configuration below; 12 epochs
    python benchmarks/time_to_accuracy.py --configs default,modern --epochs 20 --target 0.85
    python benchmarks/time_to_accuracy.py --extra="--batch-size 64 --lr 1e-3"
    python benchmarks/time_to_accuracy.py --dataset digits --configs default,modern   # the second dataset
    python benchmarks/time_to_accuracy.py --configs default --epochs 1 --images-per-class 10   # a smoke test

The dataset is learnable but not trivial: 10 classes of 32x32 RGB images, each one shape (disc, ring, square,
frame, triangle up, triangle down, plus, cross, diamond, stripes) at a random position and size, in a random
colour on a random background colour, with pixel noise (--dataset digits: the digits 0-9 drawn in DejaVu Sans
instead, at a random size, rotation within 25 degrees, position and colours); --images-per-class training
images and 40% as many validation images per class, as class folders (train/, val/) in a temporary folder.
Each configuration is a list of train.py flags added to the common ones (resnet18 at 32 px on the CPU, no
loader processes). The table shows each run's wall-clock seconds (start-up and validation included), the
summed epoch seconds (metrics.csv's `seconds`) until val_acc first reaches --target, and the best val_acc
with its epoch.
"""

import argparse
import csv
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default": [],
    "modern": ["--recipe", "modern"],
    # 3/4 of the final 32 px, as FFCV's 160 -> 192: at 16 px resnet18's deepest maps are 1x1 (README, progressive)
    "progressive": ["--progressive", "24"],
    "modern+progressive": ["--recipe", "modern", "--progressive", "24"],
    # what the preset leaves out, each added to it
    "modern+trivial": ["--recipe", "modern", "--augment", "trivial"],
    "modern+ema": ["--recipe", "modern", "--ema"],
}
SHAPES = ("disc", "ring", "square", "frame", "triangle_up", "triangle_down", "plus", "cross", "diamond", "stripes")
SIZE = 32
SCALE = 4  # shapes are drawn at 4x and downsized: smooth edges, like a photographed object


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every run")
    parser.add_argument("--target", type=float, default=0.8, help="the val_acc whose time to reach is reported")
    parser.add_argument("--images-per-class", type=int, default=100, help="training images per class (val: 40%%)")
    parser.add_argument("--extra", default="", help='train.py flags added to every run, e.g. --extra="--weights w.pth"')
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument(
        "--dataset", choices=["shapes", "digits"], default="shapes", help="shapes, or the digits 0-9 drawn in a font"
    )
    return parser


# ------------------------------------------------------------------------------------------------- data


def draw_shape(draw, shape, cx, cy, r, colour):
    """One shape of radius `r` (in the 4x drawing's pixels) centred on (cx, cy)."""
    thick = max(SCALE * 2, int(r * 0.35))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=thick)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "frame":
        draw.rectangle(box, outline=colour, width=thick)
    elif shape == "triangle_up":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "triangle_down":
        draw.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx, cy + r)], fill=colour)
    elif shape == "plus":
        draw.rectangle((cx - thick // 2, cy - r, cx + thick // 2, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - thick // 2, cx + r, cy + thick // 2), fill=colour)
    elif shape == "cross":
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=colour, width=thick)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=colour, width=thick)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "stripes":
        for dy in (-r, r // 3):
            draw.rectangle((cx - r, cy + dy, cx + r, cy + dy + 2 * r // 3), fill=colour)


def make_image(shape, rng):
    """A 32x32 RGB image of one shape: random size, position and colours, then pixel noise."""
    background = rng.integers(0, 256, 3)
    while True:  # a foreground that stands out from the background by brightness, not only hue
        foreground = rng.integers(0, 256, 3)
        if abs(int(foreground.mean()) - int(background.mean())) >= 50:
            break
    big = SIZE * SCALE
    r = int(rng.uniform(5, 12) * SCALE)  # radius 5 to 12 of the 32 pixels
    cx, cy = (int(rng.integers(r + SCALE, big - r - SCALE)) for _ in range(2))
    image = Image.new("RGB", (big, big), tuple(int(v) for v in background))
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, tuple(int(v) for v in foreground))
    pixels = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_digit(digit, rng, font_path):
    """A 32x32 RGB image of one digit: a random size, rotation (within 25 degrees), position and colours."""
    from PIL import ImageFont

    background = rng.integers(0, 256, 3)
    while True:
        foreground = rng.integers(0, 256, 3)
        if abs(int(foreground.mean()) - int(background.mean())) >= 50:
            break
    big = SIZE * SCALE
    font = ImageFont.truetype(font_path, int(rng.uniform(14, 26) * SCALE))
    glyph = Image.new("L", (big, big), 0)
    ImageDraw.Draw(glyph).text((big / 2, big / 2), digit, fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR)
    shift = [int(v) for v in rng.integers(-5 * SCALE, 5 * SCALE + 1, 2)]
    glyph = glyph.transform(glyph.size, Image.Transform.AFFINE, (1, 0, shift[0], 0, 1, shift[1]))
    image = Image.composite(Image.new("RGB", glyph.size, tuple(int(v) for v in foreground)),
                            Image.new("RGB", glyph.size, tuple(int(v) for v in background)), glyph)  # fmt: skip
    pixels = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_dataset(folder, per_class, seed, kind="shapes"):
    """train/<class>/*.png and val/<class>/*.png under `folder`; returns (train count, val count)."""
    rng = np.random.default_rng(seed)
    counts = {"train": per_class, "val": max(2, round(0.4 * per_class))}
    if kind == "digits":
        from matplotlib import font_manager

        font_path = font_manager.findfont("DejaVu Sans")
        classes, make = [str(d) for d in range(10)], lambda name: make_digit(name, rng, font_path)
    else:
        classes, make = SHAPES, lambda name: make_image(name, rng)
    for part, count in counts.items():
        for name in classes:
            (folder / part / name).mkdir(parents=True)
            for index in range(count):
                make(name).save(folder / part / name / f"{index:04d}.png")
    return counts["train"] * len(classes), counts["val"] * len(classes)


# ------------------------------------------------------------------------------------------------- runs


def run_config(name, flags, data_dir, work_dir, opts):
    """One `python train.py` run; returns (wall-clock seconds, its metrics.csv rows), or (seconds, None) on
    failure, after printing the end of its output."""
    run_dir = work_dir / f"run_{name}"
    common = ["--data", str(data_dir), "--model", "resnet18", "--image-size", str(SIZE), "--epochs", str(opts.epochs)]
    common += ["--device", "cpu", "--workers", "0", "--no-duplicate-check", "--output-dir", str(run_dir)]
    command = [sys.executable, str(REPO / "train.py"), *common, *flags, *shlex.split(opts.extra)]
    print(f"{name}: {shlex.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        print(f"{name}: train.py exited {done.returncode} after {seconds:.0f} s:\n{tail}", flush=True)
        return seconds, None
    with open(run_dir / "metrics.csv", newline="") as f:
        return seconds, list(csv.DictReader(f))


def summary(rows, target):
    """(seconds to reach target or None, best val_acc, its epoch) from metrics.csv rows."""
    elapsed, reached = 0.0, None
    for row in rows:
        elapsed += float(row["seconds"])
        if reached is None and float(row["val_acc"]) >= target:
            reached = elapsed
    best = max(rows, key=lambda row: float(row["val_acc"]))  # the first epoch at the best accuracy
    return reached, float(best["val_acc"]), int(best["epoch"])


def main(opts):
    names = [name.strip() for name in opts.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise SystemExit(f"error: --configs {opts.configs}: choose from {', '.join(CONFIGS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as folder:
        work_dir = Path(folder)
        started = time.perf_counter()
        train_count, val_count = make_dataset(work_dir / "data", opts.images_per_class, opts.seed, opts.dataset)
        made = time.perf_counter() - started
        print(f"data: 10 {opts.dataset}, {train_count} train + {val_count} val images of {SIZE}x{SIZE}, "
              f"written in {made:.1f} s", flush=True)  # fmt: skip
        for name in names:
            seconds, rows = run_config(name, CONFIGS[name], work_dir / "data", work_dir, opts)
            results.append((name, seconds, summary(rows, opts.target) if rows else None))

    header = ("config", "wall s", f"s to val_acc {opts.target:g}", "best val_acc", "at epoch")
    table = [header]
    for name, seconds, result in results:
        if result is None:
            table.append((name, f"{seconds:.1f}", "failed", "", ""))
            continue
        reached, best_acc, best_epoch = result
        table.append(
            (name, f"{seconds:.1f}", "not reached" if reached is None else f"{reached:.1f}", f"{best_acc:.3f}",
             str(best_epoch))
        )  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                        enumerate(zip(row, widths))))  # fmt: skip
    return 1 if any(result is None for _, _, result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
