"""Regenerate the bundled sample dataset: data/labels.csv and data/images/.

Three classes of small synthetic "scans" (a bright blob on a noisy background) that differ in the shape and
tint of the blob. Easy enough that resnet34 learns it from scratch in 3 epochs on a laptop CPU.

    python data/make_sample.py
"""

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASSES = {"circle": (230, 90, 80), "square": (80, 200, 90), "triangle": (90, 110, 235)}
IMAGES_PER_CLASS = 80
SIZE = 96


def draw(shape, tint, rng):
    background = tuple(rng.randint(20, 70) for _ in range(3))
    image = Image.effect_noise((SIZE, SIZE), rng.randint(20, 40)).convert("RGB")
    image = Image.blend(image, Image.new("RGB", (SIZE, SIZE), background), 0.6)
    pen = ImageDraw.Draw(image)
    radius = rng.randint(18, 34)
    cx, cy = rng.randint(radius, SIZE - radius), rng.randint(radius, SIZE - radius)
    colour = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in tint)
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == "square":
        pen.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def main():
    rng = random.Random(0)
    here = Path(__file__).resolve().parent
    (here / "images").mkdir(exist_ok=True)
    rows = []
    for shape, tint in CLASSES.items():
        for i in range(IMAGES_PER_CLASS):
            name = f"{shape}_{i:03d}.jpg"
            draw(shape, tint, rng).save(here / "images" / name, quality=85)
            rows.append((name, shape))
    rng.shuffle(rows)
    with open(here / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} images to {here / 'images'} and {here / 'labels.csv'}")


if __name__ == "__main__":
    main()
