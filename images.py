"""The one door to pixels: which files are images, where an entry's file is, what its header says (size,
orientation), the check of every image before training, and `load_image(path, short_side)`, which every
module that reads pixels goes through (the dataset and its RAM cache, the duplicate check, Grad-CAM, predict).
No other module opens an image file. DICOM files (.dcm, .dicom, or no extension and "DICM" at byte 128) are read
with pydicom, here too: modality LUT, then the VOI LUT or window (or --window), MONOCHROME1 inverted, 8-bit.
"""

import os
import re
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from devices import decode_threads, map_in_threads
from errors import DataError
from presets import resized_size

# DICOM files: these extensions, or none and the DICOM magic b"DICM" at bytes 128-131 (PS3.10 7.1).
DICOM_EXTENSIONS = (".dcm", ".dicom")
# torchvision's image extensions and DICOM's: what class folders and predict.py's folders are searched for.
IMAGE_EXTENSIONS = IMG_EXTENSIONS + DICOM_EXTENSIONS
# --window presets (center, width) in Hounsfield units, the CT window settings of Radiopaedia's "Windowing (CT)"
# article (radiopaedia.org/articles/windowing-ct): brain W80 L40, lung W1500 L-600, mediastinum W350 L50,
# abdomen (soft tissue) W400 L40, bone W1800 L400.
WINDOW_PRESETS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
# What to install when a compressed DICOM has no decoder (pydicom's JPEG, JPEG-LS and JPEG 2000 plug-ins).
DICOM_DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
# 16- and 32-bit greyscale: to_rgb rescales them, --window windows them.
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
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
            if is_dicom(path):
                return dicom_size(path), None
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
    if type(error).__name__ == "InvalidDicomError":
        return "not a DICOM file pydicom can read"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_image(path, short_side=None, window=None):
    """Open an image file as 8-bit RGB, whatever its mode, upright according to its EXIF orientation.

    With `short_side`, the image is reduced (never enlarged) so that its shorter side is at most `short_side`
    pixels, decoding only what that needs; see `reduce_on_load`. A DICOM file is rendered by `dicom_image`;
    `window` (--window: "CENTER,WIDTH" or a preset name) replaces its window, and windows the stored values
    of 16-bit greyscale PNG/TIFF files too.
    """
    window = parse_window(window)
    if is_dicom(path):
        im = dicom_image(path, window)
        return im if short_side is None else reduce_on_load(im, short_side)
    with Image.open(path) as im:
        if window is not None and im.mode in WIDE_GREY_MODES:
            im.load()
            im = Image.fromarray(windowed(np.asarray(im, dtype=np.float64), window))
        if short_side is not None:
            return reduce_on_load(im, short_side)
        im = ImageOps.exif_transpose(im)  # also loads the first frame of an animation or multi-page file
        return to_rgb(im)


def parse_window(window):
    """(center, width) of a --window value: None, a (center, width) pair, "CENTER,WIDTH" or a preset name.
    Raises ValueError with a one-line reason for anything else."""
    if window is None or isinstance(window, tuple):
        return window
    text = str(window).strip().lower()
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    presets = ", ".join(WINDOW_PRESETS)
    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{window!r} is neither CENTER,WIDTH (e.g. -600,1500) nor a preset ({presets})") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
        raise ValueError(f"{window!r}: the center must be a number and the width at least 1")
    return center, width


def is_dicom(path):
    """Whether a file is DICOM: a .dcm or .dicom name, or no extension and the magic bytes (a file read)."""
    name = str(path).lower()
    if name.endswith(DICOM_EXTENSIONS):
        return True
    if Path(name).suffix:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_header(path):
    """The DICOM header of a file, without its pixels."""
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def dicom_size(path):
    """(width, height) of a DICOM image from its header, refusing what pydicom could not decode later: no
    image in it, pixel data shorter than its size needs (a truncated file), a compressed transfer syntax whose
    decoder plug-in is not installed."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import get_decoder

    ds = dicom_header(path)
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("a DICOM file without Rows/Columns: no image in it, or truncated")
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ValueError(f"compressed as {syntax.name} ({syntax}) and no decoder is installed: {DICOM_DECODERS}")
    else:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        needed = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated) // 8
        if Path(path).stat().st_size < needed:
            raise ValueError(f"truncated: its pixels need {needed} bytes, the file has {Path(path).stat().st_size}")
    return int(ds.Columns), int(ds.Rows)


_warned_multiframe = threading.Event()


def dicom_image(path, window=None):
    """A DICOM file's first frame as an 8-bit RGB image, rendered with pydicom's own functions in the
    standard's order: the modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI LUT
    or the first window (Center/Width), or `window` (center, width) instead; MONOCHROME1 inverted; the VOI's
    output range (without one: the image's own min..max) scaled to 0-255, grey copied to R, G and B. Colour
    (RGB, YBR) comes out as pydicom converts it to RGB."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        ds.pixel_array_options(index=0)  # decode the first frame only
        if not _warned_multiframe.is_set():
            _warned_multiframe.set()
            print(
                f"warning: {path} has {frames} frames; only the first is used (of this and any other)", file=sys.stderr
            )
    pixels = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour: RGB already (pydicom converts YBR)
        if pixels.dtype != np.uint8:
            pixels = pixels.astype(np.float64) * (255.0 / (2 ** int(ds.BitsStored) - 1))
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert("RGB")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if window is None and "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0)
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif window is not None or ("WindowCenter" in ds and "WindowWidth" in ds):
        if window is None:
            function = str(ds.get("VOILUTFunction", "LINEAR"))
            window = tuple(float(_first(ds[k].value)) for k in ("WindowCenter", "WindowWidth"))
        else:
            function = "LINEAR"
        values, low, high = windowed(values, window, function).astype(np.float64), 0.0, 255.0
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = high + low - values
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _first(value):
    """The first of a multi-valued DICOM element (several windows), or the value itself."""
    return value[0] if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else value


def windowed(values, window, function="LINEAR"):
    """`values` through the window (center, width) as 8-bit greyscale (0-255), with pydicom's apply_windowing
    (PS3.3 C.11.2.1.2), on a dataset that holds only the window and an 8-bit output range."""
    from pydicom.dataset import Dataset
    from pydicom.pixels.processing import apply_windowing

    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored, view.PixelRepresentation = 8, 0
    view.WindowCenter, view.WindowWidth = window
    view.VOILUTFunction = function
    return np.clip(np.rint(apply_windowing(np.asarray(values, dtype=np.float64), view)), 0, 255).astype(np.uint8)


def dicom_values(paths, keyword, required=True):
    """The value of the DICOM header element `keyword` (e.g. PatientID) of each file, read in threads as
    check_images reads headers: text, or None where the header cannot be read (check_images reports it).
    A readable header without the keyword raises KeyError(path), or with `required` False gives None."""

    def value(path):
        try:
            ds = dicom_header(path)
        except Exception:
            return None
        if keyword not in ds or str(ds.data_element(keyword).value).strip() == "":
            if not required:
                return None
            raise KeyError(str(path))
        return str(ds.data_element(keyword).value).strip()

    return list(map_in_threads(value, list(paths), 4 * decode_threads()))


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
    return _reduced(im.size, short_side)


def _reduced(size, short_side):
    """The size reduce_on_load gives an image of `size` (after any draft)."""
    width, height = size
    factor = _reduce_factor(size, short_side)
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
    if im.mode in (*WIDE_GREY_MODES, "F"):
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
    """Whether a file name has one of the image extensions, or has none and is DICOM (its magic bytes)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS) or (not Path(str(path)).suffix and is_dicom(path))


def looks_like_images(values):
    """Most values end in an image file extension (a CSV column of image paths)."""
    return sum(is_image_file(v) for v in values) > len(values) / 2


def upright_size(path):
    """(width, height) of an image file as shown, its EXIF orientation applied, from its header."""
    if is_dicom(path):
        ds = dicom_header(path)
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as im:
        width, height = im.size
        return (height, width) if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8) else (width, height)


def planned_pixels(path, short_side=None):
    """Width x height of the image as load_image(path, short_side) will return it, from its header alone."""
    if is_dicom(path):
        ds = dicom_header(path)
        size = (int(ds.Columns), int(ds.Rows))
        width, height = size if short_side is None else _reduced(size, short_side)
        return width * height
    with Image.open(path) as im:
        width, height = im.size if short_side is None else reduced_size(im, short_side)
        return width * height
