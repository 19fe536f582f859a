"""Time of the duplicate check (duplicates.find_duplicates) on N synthetic images split 70/30.

    python benchmarks/duplicates_benchmark.py                 # 2,000 and 20,000 images of 128x128 JPEG
    python benchmarks/duplicates_benchmark.py --images 5000 --size 512

Prints the time of the whole check, and of its two stages: decoding and fingerprinting every image (on all
cores, as in a run), and comparing all pairs (the vectorised Hamming distance and the thumbnail test).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import devices
import duplicates  # noqa: E402
from labels import ImageSet


def write_images(folder, count, size, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        noise = rng.integers(0, 24, (size, size, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(field).resize((size, size), Image.BICUBIC)) // 2 + noise
        Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000], help="image counts to time")
    parser.add_argument("--size", type=int, default=128, help="side of the square JPEGs")
    args = parser.parse_args()
    print(f"{devices.cpu_cores()} cores, {devices.decode_threads()} decode threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = write_images(folder, max(args.images), args.size)
        for count in args.images:
            samples = pd.DataFrame({"image": names[:count], "label": "a"})
            split = int(0.7 * count)
            parts = {
                "train": ImageSet(samples[:split], folder, "train"),
                "val": ImageSet(samples[split:].reset_index(drop=True), folder, "val"),
            }
            paths = [folder / name for name in names[:count]]
            start = time.perf_counter()
            prints = list(devices.map_in_threads(duplicates.fingerprint, paths, devices.decode_threads()))
            fingerprinted = time.perf_counter() - start
            phash = np.array([p[1] for p in prints], dtype=np.uint64)
            exact = np.array([p[0] for p in prints], dtype=np.int64)
            start = time.perf_counter()
            close = sum(1 for _ in duplicates.close_pairs(phash, exact))
            compared = time.perf_counter() - start
            start = time.perf_counter()
            found = duplicates.find_duplicates(parts)
            whole = time.perf_counter() - start
            print(
                f"{count} images of {args.size}x{args.size}: whole check {whole:.2f} s "
                f"(fingerprints {fingerprinted:.2f} s, "
                f"all {count * (count - 1) // 2:,} pairs compared in {compared:.2f} s, {close} within the hash "
                f"distance), {len(found.pairs)} copies across parts, {found.within_parts} inside one"
            )


if __name__ == "__main__":
    main()
