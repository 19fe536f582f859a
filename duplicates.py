"""Copies of one image in two parts of a split (train, val, test): the same image exported twice, resized,
re-encoded, slightly brightened or cropped. Validation on such a copy measures memory, not the model.

Every image is decoded once, reduced (JPEGs by draft decoding, as load_image does), into three
fingerprints: the reduced pixels themselves (equal: an exact copy), a 64-bit perceptual hash (imagehash's
pHash), and a 16x16 colour thumbnail. All pairs are compared at once on the pHash (vectorised Hamming
distance); a pair within NEAR_DISTANCE is a near copy when its thumbnails also correlate at NEAR_CORRELATION
or more. The second test is there because pHash sees only grey-level structure: distinct images with the
same layout (a circle in the middle, in another colour, on another background) can share a pHash, and did
in this project's own sample. Measured on synthetic sets: resized 0.75x, JPEG quality 60 and +10% brightness
keep the thumbnail correlation at 0.99 or more and a 3-5% crop at 0.975 or more; the closest distinct pair of
the sample that pHash confuses correlates at 0.966.
"""

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

import devices
import errors
from files import write_csv_atomically
from images import load_image, resolve_image_path

DECODE_SIDE = 64  # pixels of the shorter side the fingerprints are computed from
NEAR_DISTANCE = 10  # of 64 pHash bits
NEAR_CORRELATION = 0.97
COLUMNS = ["image_a", "part_a", "image_b", "part_b", "kind", "distance", "same_label"]


class Duplicates(NamedTuple):
    """Copies across parts (rows of duplicates.csv, the first image in the earlier part) and how many pairs
    of copies there are inside one part (counted, not listed)."""

    pairs: list
    within_parts: int


def fingerprint(path, window=None):
    """(exact key, 64-bit pHash, normalised thumbnail) of one image as the run sees it (its --window), or None
    when it cannot be decoded."""
    import imagehash
    from PIL import Image

    try:
        image = load_image(path, DECODE_SIDE, window)
    except Exception:
        return None  # the image check has already decided about unreadable files
    exact = (image.size, image.tobytes())
    phash = int(str(imagehash.phash(image)), 16)
    thumb = np.asarray(image.resize((16, 16), Image.Resampling.BOX), dtype=np.float64).ravel()
    thumb -= thumb.mean()
    return hash(exact), phash, thumb / (np.linalg.norm(thumb) + 1e-9)


def find_duplicates(parts, window=None):
    """Duplicates among `parts` ({name: ImageSet or None}, in the order train, val, test)."""
    names, images, labels, paths = [], [], [], []
    for name, part in parts.items():
        if part is None:
            continue
        for image, label in zip(part.samples["image"], part.samples["label"]):
            names.append(name), images.append(image), labels.append(label)
            paths.append(resolve_image_path(part.root, image))
    prints = list(devices.map_in_threads(lambda path: fingerprint(path, window), paths, devices.decode_threads()))
    kept = [i for i, p in enumerate(prints) if p is not None]
    exact = np.array([prints[i][0] for i in kept], dtype=np.int64)
    phash = np.array([prints[i][1] for i in kept], dtype=np.uint64)
    thumbs = np.stack([prints[i][2] for i in kept]) if kept else np.zeros((0, 768))
    pairs, within = [], 0
    for a, b, distance in close_pairs(phash, exact):
        correlation = float(thumbs[a] @ thumbs[b])
        is_exact = exact[a] == exact[b]
        if not is_exact and correlation < NEAR_CORRELATION:
            continue
        i, j = kept[a], kept[b]
        if names[i] == names[j]:
            within += 1
            continue
        pairs.append({
            "image_a": images[i], "part_a": names[i], "image_b": images[j], "part_b": names[j],
            "kind": "exact" if is_exact else "near", "distance": 0 if is_exact else distance,
            "same_label": labels[i] == labels[j],
        })  # fmt: skip
    return Duplicates(pairs, within)


def close_pairs(phash, exact, chunk=512):
    """(a, b, Hamming distance) for a < b whose pHashes are within NEAR_DISTANCE or whose exact keys are
    equal, comparing all pairs a block of rows at a time."""
    for start in range(0, len(phash), chunk):
        rows = slice(start, start + chunk)
        distance = np.bitwise_count(phash[rows, None] ^ phash[None, :])
        close = (distance <= NEAR_DISTANCE) | (exact[rows, None] == exact[None, :])
        close &= np.arange(start, start + len(distance))[:, None] < np.arange(len(phash))[None, :]
        for a, b in zip(*np.nonzero(close)):
            yield start + int(a), int(b), int(distance[a, b])


def checked(train_set, val_set, test_set, skip=False, dedupe=False, window=None):
    """(val_set, test_set, Duplicates or None when `skip`): with `dedupe`, val and test without their copies."""
    if skip:
        return val_set, test_set, None
    found = find_duplicates({"train": train_set, "val": val_set, "test": test_set}, window)
    return (*without_copies(found, val_set, test_set), found) if dedupe else (val_set, test_set, found)


def without_copies(found, val_set, test_set):
    """val_set and test_set (ImageSets or None) without their images that copy an image of an earlier part."""
    dropped = {(pair["part_b"], pair["image_b"]) for pair in found.pairs}
    kept = [
        part._replace(
            samples=part.samples[[(name, i) not in dropped for i in part.samples["image"]]].reset_index(drop=True)
        )
        if part is not None
        else None
        for name, part in (("val", val_set), ("test", test_set))
    ]
    if kept[0].samples.empty:
        raise errors.DataError(f"--dedupe: every validation image copies a training image ({val_set.source})")
    return tuple(kept)


def report(output_dir, found, deduped):
    """duplicates.csv and one warning line when copies cross parts; a note when they are inside parts only."""
    if found is None or not (found.pairs or found.within_parts):
        return
    within = f"{found.within_parts} pairs of copies inside one part (counted, not listed)"
    if not found.pairs:
        print(f"note: {within}", file=sys.stderr)
        return
    write_csv_atomically(Path(output_dir) / "duplicates.csv", COLUMNS, found.pairs)
    exact = sum(pair["kind"] == "exact" for pair in found.pairs)
    conflicts = sum(not pair["same_label"] for pair in found.pairs)
    copies = len({(pair["part_b"], pair["image_b"]) for pair in found.pairs})
    parts = "/".join(sorted({pair["part_b"] for pair in found.pairs}))
    pairs = f"{len(found.pairs)} pairs: {exact} exact, {len(found.pairs) - exact} near; "
    pairs += f"{len(found.pairs) - conflicts} with the same label (leakage)"
    pairs += f", {conflicts} with different labels (labelling conflicts)" if conflicts else ""
    action = f"--dedupe dropped those {copies} images" if deduped else "--dedupe drops them"
    print(
        f"warning: {copies} images in {parts} copy an image of an earlier part ({pairs})"
        f"{'; ' + within if found.within_parts else ''}; see {Path(output_dir) / 'duplicates.csv'}; {action}",
        file=sys.stderr,
    )
