"""The CSV-backed dataset: which images there are, what their labels are, and how to open them.

This module knows about files and labels, not about training. Everything a user can get wrong in a CSV or
an image folder is caught here and reported as a `DataError` whose message names the file, the line or
the column and says what to do.
"""

import csv
import io
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate

# Transparent pixels are composited onto this colour (white, like a page or a viewer's background).
BACKGROUND_RGB = (255, 255, 255)
# Labels that are really a missing value left behind by a spreadsheet or by pandas.
MISSING_LABELS = {"", "nan", "na", "n/a", "null"}


class DataError(Exception):
    """Bad input data. The message is meant for the user, as one line."""


def read_labels(csv_path, image_col=None, label_col=None):
    """Read a CSV of image paths and labels into a DataFrame with columns image, label and line.

    `line` is the line number in the file (the header is line 1), so errors and reports can point at it.
    Without explicit column names, `image` and `label` are used, or the only two columns in order.
    Labels are kept as text so that `1`, `2`, `10` stay what they are.
    """
    header, rows = read_csv_rows(csv_path)
    image_col, label_col = _pick_columns(csv_path, header, image_col, label_col)
    image_at, label_at = header.index(image_col), header.index(label_col)
    records = []
    for line, fields in rows:
        image, label = fields[image_at].strip(), fields[label_at].strip()
        if not image:
            raise DataError(f"{csv_path} line {line}: empty '{image_col}'; give every row an image path")
        if label.lower() in MISSING_LABELS:
            raise DataError(
                f"{csv_path} line {line}: missing label ({label!r}) for {image}; fill it in or drop the row"
            )
        records.append((image.replace("\\", "/"), label, line))
    samples = pd.DataFrame(records, columns=["image", "label", "line"])
    return _drop_duplicates(csv_path, samples)


def read_images(csv_path, image_col="image"):
    """Read only the image column of a CSV (for prediction): a DataFrame with columns image and line."""
    header, rows = read_csv_rows(csv_path)
    if image_col not in header:
        found = ", ".join(repr(name) for name in header)
        raise DataError(f"{csv_path}: no column {image_col!r} (columns found: {found}); name it with --image-col")
    at = header.index(image_col)
    records = [(fields[at].strip().replace("\\", "/"), line) for line, fields in rows if fields[at].strip()]
    return pd.DataFrame(records, columns=["image", "line"])


def read_csv_rows(csv_path):
    """The header and the (line number, fields) of each non-blank row of a UTF-8 CSV with a header row.

    Refuses what would otherwise be read wrongly without a word: other encodings, NUL bytes, and rows with
    more or fewer fields than the header (pandas shifts such a row silently).
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise DataError(f"{csv_path}: no such file; give a CSV of image paths and labels")
    if csv_path.is_dir():
        raise DataError(f"{csv_path} is a directory; give a CSV file of image paths and labels")
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # the BOM Excel writes is accepted
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{csv_path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save it as 'CSV UTF-8'"
        ) from None
    if "\0" in text:
        line = _line_at(text, text.index("\0"))
        raise DataError(f"{csv_path} line {line}: NUL byte; a CSV is plain text, save it as 'CSV UTF-8'")
    # Only \n, \r and \r\n end lines, as the csv module counts them: str.splitlines would also break on
    # form feeds, U+0085 and U+2028 inside a name and report rows on lines that no editor shows.
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or all(not name.strip() for name in header):
        raise DataError(f"{csv_path} is empty; it needs a header row and one row per image")
    header = [name.strip() for name in header]
    rows = []
    for fields in reader:
        if not any(field.strip() for field in fields):
            continue  # blank lines, often at the end of a file
        if len(fields) != len(header):
            raise DataError(
                f"{csv_path} line {reader.line_num}: {len(fields)} fields but the header has {len(header)}; "
                "quote values that contain commas"
            )
        rows.append((reader.line_num, fields))
    if not rows:
        raise DataError(f"{csv_path} has a header but no rows; add one row per image")
    return header, rows


def _line_at(text, index):
    """The line number of `text[index]`, counting line ends the way csv.reader does."""
    return len(re.findall(r"\r\n|\r|\n", text[:index])) + 1


def _pick_columns(csv_path, header, image_col, label_col):
    found = ", ".join(repr(name) for name in header)
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{csv_path}: duplicate column {duplicated[0]!r} (columns found: {found})")
    if image_col is None and label_col is None:
        if {"image", "label"} <= set(header):
            return "image", "label"
        if len(header) == 2:
            return header[0], header[1]
    image_col, label_col = image_col or "image", label_col or "label"
    for flag, name in (("--image-col", image_col), ("--label-col", label_col)):
        if name not in header:
            raise DataError(f"{csv_path}: no column {name!r} (columns found: {found}); name it with {flag}")
    if image_col == label_col:
        raise DataError(f"{csv_path}: --image-col and --label-col are both {image_col!r}")
    return image_col, label_col


def _drop_duplicates(csv_path, samples):
    repeated = samples[samples.duplicated("image", keep=False)]
    for image, rows in repeated.groupby("image", sort=False):
        if rows["label"].nunique() > 1:
            lines = ", ".join(str(n) for n in rows["line"])
            raise DataError(f"{csv_path}: {image} has conflicting labels on lines {lines}; keep one label per image")
    if len(repeated):
        unique = samples.drop_duplicates("image").reset_index(drop=True)
        print(
            f"warning: {csv_path}: {len(samples) - len(unique)} repeated rows (same image, same label) were dropped",
            file=sys.stderr,
        )
        return unique
    return samples


def sorted_class_names(labels):
    """The distinct labels in order: numerically when they are all integers, else alphabetically."""
    names = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def resolve_image_path(root, image):
    """The file an image entry refers to, refusing anything that would escape `root`."""
    if "\0" in image:
        raise ValueError("path contains a NUL byte")
    if image.startswith("~") or os.path.isabs(image) or re.match(r"^[A-Za-z]:", image):
        raise ValueError("path must be relative to --root")
    root = Path(root).resolve()
    path = (root / image).resolve()
    if not path.is_relative_to(root):
        raise ValueError("path points outside --root")
    return path


def check_images(samples, root, csv_path, limit=5):
    """Check every listed image before training: inside `root`, a non-empty file, a header Pillow can read.

    Returns the image sizes (width, height) in order. Raises one `DataError` listing how many are bad and
    the first few, so a user fixes them all in one go instead of one per run.
    """
    if not Path(root).is_dir():
        raise DataError(f"{root}: no such folder; pass the folder the CSV's image paths are relative to with --root")
    problems, sizes = [], []
    for image, line in zip(samples["image"], samples["line"]):
        try:
            path = resolve_image_path(root, image)
            if not path.exists():
                raise ValueError("no such file")
            if not path.is_file():
                raise ValueError("not a file")
            if path.stat().st_size == 0:
                raise ValueError("empty file")
            with Image.open(path) as im:
                sizes.append(im.size)
        except Exception as e:  # Pillow raises many types, DecompressionBombError is not an OSError
            problems.append(f"line {line} {image} ({describe(e)})")
    if problems:
        shown = "; ".join(problems[:limit]) + ("; ..." if len(problems) > limit else "")
        raise DataError(f"{csv_path}: {len(problems)} of {len(samples)} images are unusable under {root}: {shown}")
    return sizes


def describe(error):
    """A short, one-line reason for a failed image, for messages."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_image(path):
    """Open an image file as 8-bit RGB, whatever its mode, upright according to its EXIF orientation."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # also loads the first frame of an animation or multi-page file
        return to_rgb(im)


def to_rgb(im):
    """Convert any Pillow image to RGB without losing what is in it.

    16- and 32-bit greyscale is rescaled from the 16-bit range (a plain convert clips it to 255);
    transparent pixels are composited onto BACKGROUND_RGB instead of showing whatever colour they hide.
    """
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        elif im.mode != "F" or values.max(initial=0) > 255:
            values = values / 257.0  # 65535 -> 255
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


class BadImage(NamedTuple):
    """An image that failed to decode, handed to the training loop instead of a sample."""

    image: str
    line: int
    reason: str


class MyDataset(Dataset):
    """The images listed in a CSV (see `read_labels`), with labels as class indices.

    An image that fails to decode yields `(BadImage, label)` instead of raising, so the training loop can
    decide what to do with it (stop, or skip it) wherever the loading ran, DataLoader workers included.
    """

    def __init__(self, samples, root, class_names, transform=None):
        self.root = Path(root)
        self.images = list(samples["image"])
        self.lines = list(samples["line"])
        index_of = {name: i for i, name in enumerate(class_names)}
        self.targets = [index_of[label] for label in samples["label"]]
        self.transform = transform
        self.cache = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        try:
            image = self._cached(index) if self.cache else self._load(index)
            if self.transform is not None:
                image = self.transform(image)
        except Exception as e:
            return BadImage(self.images[index], self.lines[index], describe(e)), self.targets[index]
        return image, self.targets[index]

    def fill_cache(self, shrink):
        """Decode every image once and keep it in RAM, after `shrink` (a PIL -> PIL resize that caps its size).

        The pixels live in one shared-memory uint8 tensor, so DataLoader workers read them without a copy.
        Images that fail to decode are left out of the cache and fail again (and are reported) when read.
        """
        decoded = []
        for index in range(len(self)):
            try:
                image = shrink(self._load(index))
                decoded.append(np.asarray(image))
            except Exception:
                decoded.append(None)
        shapes = [a.shape if a is not None else (0, 0, 3) for a in decoded]
        offsets = np.cumsum([0] + [h * w * 3 for h, w, _ in shapes])
        pixels = torch.empty(int(offsets[-1]), dtype=torch.uint8).share_memory_()
        for a, start in zip(decoded, offsets):
            if a is not None:
                pixels[start : start + a.size].numpy()[:] = a.reshape(-1)
        self.cache = (pixels, offsets.tolist(), shapes)

    def _load(self, index):
        return load_image(resolve_image_path(self.root, self.images[index]))

    def _cached(self, index):
        pixels, offsets, shapes = self.cache
        height, width, _ = shapes[index]
        if height == 0:  # failed when the cache was filled: fail again now, and be reported
            return self._load(index)
        start = offsets[index]
        array = pixels[start : start + height * width * 3].numpy().reshape(height, width, 3)
        return Image.fromarray(array)


def collate_skipping_bad(batch):
    """Collate the good samples of a batch; return (images, labels, bad) where bad lists the BadImages.

    When every sample failed, images and labels are None.
    """
    good = [sample for sample in batch if not isinstance(sample[0], BadImage)]
    bad = [sample[0] for sample in batch if isinstance(sample[0], BadImage)]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad
