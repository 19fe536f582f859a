"""The one door to pixels: which files are images, where an entry's file is, what its header says (size,
orientation), the check of every image before training, and `load_image(path, short_side)`, which every
module that reads pixels goes through (the dataset and its RAM cache, the duplicate check, Grad-CAM, predict).
No other module opens an image file.
"""

import os
import re
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from devices import decode_threads, map_in_threads
from errors import DataError
from presets import resized_size

# torchvision's image extensions: what class folders and predict.py's folders are searched for.
IMAGE_EXTENSIONS = IMG_EXTENSIONS
# Transparent pixels are composited onto this colour (white, like a page or a viewer's background).
BACKGROUND_RGB = (255, 255, 255)


def where(line, image):
    """How messages point at an image: its CSV line when it came from a CSV, else its path."""
    return f"line {line} {image}" if line else str(image)


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


def check_images(samples, root, csv_path, limit=5, skip_bad=False):
    """Check every listed image before training: inside `root`, a non-empty file, a header Pillow can read.

    Returns the image sizes (width, height) in order. Raises one `DataError` listing how many are bad and
    the first few, so a user fixes them all in one go instead of one per run; with `skip_bad`, a bad image's
    size is None instead.
    """
    if not Path(root).is_dir():
        raise DataError(f"{root}: no such folder; pass the folder the CSV's image paths are relative to with --root")

    def check(image):
        """(size, None) or (None, reason) for one image."""
        try:
            path = resolve_image_path(root, image)
            if not path.exists():
                raise ValueError("no such file")
            if not path.is_file():
                raise ValueError("not a file")
            if path.stat().st_size == 0:
                raise ValueError("empty file")
            with Image.open(path) as im:
                return im.size, None
        except Exception as e:  # Pillow raises many types, DecompressionBombError is not an OSError
            return None, describe(e)

    # Threads: reading headers is mostly waiting on the file system (a network drive, a cold disk cache).
    images = list(samples["image"])
    checked = list(map_in_threads(check, images, 4 * decode_threads()))
    sizes = [size for size, _ in checked]
    problems = [
        f"{where(line, image)} ({reason})"
        for image, line, (_, reason) in zip(images, samples["line"], checked)
        if reason is not None
    ]
    if problems and not skip_bad:
        shown = "; ".join(problems[:limit]) + ("; ..." if len(problems) > limit else "")
        raise DataError(f"{csv_path}: {len(problems)} of {len(samples)} images are unusable under {root}: {shown}")
    return sizes


def describe(error):
    """A short, one-line reason for a failed image, for messages."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_image(path, short_side=None):
    """Open an image file as 8-bit RGB, whatever its mode, upright according to its EXIF orientation.

    With `short_side`, the image is reduced (never enlarged) so that its shorter side is at most `short_side`
    pixels, decoding only what that needs; see `reduce_on_load`.
    """
    with Image.open(path) as im:
        if short_side is not None:
            return reduce_on_load(im, short_side)
        im = ImageOps.exif_transpose(im)  # also loads the first frame of an animation or multi-page file
        return to_rgb(im)


# Image modes that Image.reduce and Image.resize average correctly, so that to_rgb can come after them. Other
# modes (palette, 1-bit, 16/32-bit, float) are converted by to_rgb first: it looks at the whole image.
REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK"}


# What ImageOps.exif_transpose does for each EXIF orientation.
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def reduce_on_load(im, short_side):
    """Decode the just-opened image `im` reduced so that its shorter side is `short_side` (never enlarged), as RGB.

    The rule, the same whether images are cached or not, so both see the same pixels:

    1. JPEG: draft decoding (Image.draft) at the smallest DCT scale (1/8, 1/4, 1/2 or 1) whose result still
       has a shorter side of at least `short_side`: a 4032x3024 photo for short_side 448 decodes at 1/4, as
       1008x756, several times faster than in full. Other formats decode in full.
    2. Image.reduce (a cheap box filter) by the largest integer factor that keeps the shorter side at least
       twice `short_side`, as Pillow's thumbnail does (reducing_gap 2).
    3. An antialiased bilinear resize to a shorter side of exactly `short_side`, the longer side sized as
       torchvision's Resize(short_side) sizes it (so a later Resize(short_side) does nothing).
    4. The EXIF orientation and the conversion to RGB (to_rgb), on the small image.

    For training at --image-size S, short_side = 2 * S: RandomResizedCrop (scale 0.08 to 1) resizes its crop to
    S x S, and a crop that covers at least a quarter of the image (a side of at least S pixels) keeps full
    detail; smaller crops are enlarged, as they would be from any image of that size. For validation,
    short_side = the validation Resize size, which is then exact.
    """
    im.draft("RGB", (short_side, short_side))  # JPEG only; other formats ignore it
    im.load()  # the first frame of an animation or multi-page file
    transpose = EXIF_TRANSPOSE.get(im.getexif().get(ExifTags.Base.Orientation, 1))  # as ImageOps.exif_transpose
    if im.mode not in REDUCIBLE_MODES:
        im = to_rgb(im)
    factor = _reduce_factor(im.size, short_side)
    if factor > 1:
        im = im.reduce(factor)
    size = resized_size(im.size, short_side)
    if size != im.size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    if transpose is not None:
        im = im.transpose(transpose)
    return to_rgb(im)


def reduced_size(im, short_side):
    """The (width, height) that reduce_on_load(im, short_side) will return, before the EXIF orientation,
    from the header of the just-opened image `im` alone (it drafts `im`; decode nothing)."""
    im.draft("RGB", (short_side, short_side))
    width, height = im.size
    factor = _reduce_factor(im.size, short_side)
    if factor > 1:
        width, height = -(-width // factor), -(-height // factor)  # Image.reduce rounds up
    return resized_size((width, height), short_side)


def _reduce_factor(size, short_side):
    return min(size) // (2 * short_side)


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


def is_image_file(path):
    """Whether a file name has one of the image extensions."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def looks_like_images(values):
    """Most values end in an image file extension (a CSV column of image paths)."""
    return sum(is_image_file(v) for v in values) > len(values) / 2


def upright_size(path):
    """(width, height) of an image file as shown, its EXIF orientation applied, from its header."""
    with Image.open(path) as im:
        width, height = im.size
        return (height, width) if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8) else (width, height)


def planned_pixels(path, short_side=None):
    """Width x height of the image as load_image(path, short_side) will return it, from its header alone."""
    with Image.open(path) as im:
        width, height = im.size if short_side is None else reduced_size(im, short_side)
        return width * height
