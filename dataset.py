"""The torch Dataset of a run's images: MyDataset (labelled, multi-label or unlabelled), its RAM cache, the
DataLoader options, and the bad-image plumbing (an image that fails to decode is handed to the loop, which
stops or skips it). Which images there are and their labels: labels.py; how to open one: images.py.
"""

import os
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from devices import decode_threads, map_in_threads, physical_memory
from errors import BadImageError
from images import describe, load_image, planned_pixels, resolve_image_path, where
from labels import label_matrix


class BadImage(NamedTuple):
    """An image that failed to decode, handed to the training loop instead of a sample."""

    image: str
    line: int
    reason: str


class MyDataset(Dataset):
    """The images listed in a CSV (see `read_labels`), with labels as class indices, or as multi-hot rows with
    `multi_label`.

    An image that fails to decode yields `(BadImage, label)` instead of raising, so the training loop can
    decide what to do with it (stop, or skip it) wherever the loading ran, DataLoader workers included.
    With `short_side`, every image is decoded reduced to that shorter side before the transform, cached or not
    (see `reduce_on_load`): 2 * the crop size for RandomResizedCrop, the Resize size for validation.
    `window` (--window) is passed to load_image.
    """

    def __init__(
        self,
        samples,
        root,
        class_names,
        transform=None,
        short_side=None,
        multi_label=False,
        row_numbers_from=None,
        window=None,
    ):
        self.root = Path(root) if root is not None else None  # None: image paths are used as they are
        self.images = list(samples["image"])
        self.lines = list(samples["line"])
        self.sizes = list(samples["size"]) if "size" in samples else None  # (width, height) once checked
        self.class_names = list(class_names)
        self.multi_label = multi_label
        index_of = {name: i for i, name in enumerate(class_names)}
        if row_numbers_from is not None:  # unlabelled (prediction): each image carries its row number instead
            self.targets = list(range(row_numbers_from, row_numbers_from + len(self.images)))
        elif multi_label:  # (N, C) float32 multi-hot rows, NaN where unknown (see label_matrix)
            self.targets = label_matrix(samples, self.class_names)
        else:
            self.targets = [index_of[label] for label in samples["label"]]
        self.transform = transform
        self.short_side = short_side
        self.window = window  # --window: the DICOM (and 16-bit grey) window, see images.load_image
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

    def fill_cache(self):
        """Decode every image once, reduced to `short_side` as when read from disk, and keep it in RAM.

        The pixels live in one shared-memory uint8 tensor, so DataLoader workers read them without a copy. It
        is allocated first, from the image headers (the reduced size follows from the header; the EXIF
        orientation does not change the pixel count), and the images are decoded on all cores, each written
        into its place as it is decoded, so the pixels are never held twice. Images that fail to decode are
        left out of the cache and fail again (and are reported) when read.
        """
        count, threads = len(self), decode_threads()
        planned = list(map_in_threads(self._planned_pixels, range(count), threads))
        offsets = np.cumsum([0] + [3 * pixels for pixels in planned]).tolist()
        pixels = torch.empty(offsets[-1], dtype=torch.uint8).share_memory_()
        flat = pixels.numpy()
        shapes = [(0, 0, 3)] * count  # (0, 0, 3): not cached, read from disk

        def decode(index):
            start, end = offsets[index], offsets[index + 1]
            if start == end:
                return  # the header failed: so will the image, when read
            try:
                array = np.asarray(self._load(index))
            except Exception:
                return
            if array.size == end - start:  # else a format whose header misled: read it from disk
                flat[start:end] = array.reshape(-1)
                shapes[index] = array.shape

        # Only rank 0 of a torchrun job shows the bar, on a terminal, as in training; delay: when it takes a while.
        quiet = os.environ.get("RANK", "0") != "0" or not sys.stderr.isatty()
        with tqdm(total=count, desc="caching", unit="img", leave=False, delay=2, disable=quiet) as bar:
            for _ in map_in_threads(decode, range(count), threads):
                bar.update()
        self.cache = (pixels, offsets, shapes)

    def _planned_pixels(self, index):
        """Width x height of the image as it will be cached, from its header; 0 when the header fails."""
        try:
            return planned_pixels(self._path(index), self.short_side)
        except Exception:
            return 0

    def _path(self, index):
        image = self.images[index]
        return resolve_image_path(self.root, image) if self.root is not None else Path(image)

    def _load(self, index):
        return load_image(self._path(index), self.short_side, self.window)

    def _cached(self, index):
        pixels, offsets, shapes = self.cache
        height, width, _ = shapes[index]
        if height == 0:  # not cached (it failed when the cache was filled): fail again now, and be reported
            return self._load(index)
        start = offsets[index]
        array = pixels[start : start + height * width * 3].numpy().reshape(height, width, 3)
        return Image.fromarray(array)


class BadImageLog:
    """Reports each undecodable image once, and counts them per epoch."""

    def __init__(self, skip):
        self.skip = skip
        self.seen = set()
        self.count = 0

    def handle(self, bad):
        for image in bad:
            if not self.skip:
                raise BadImageError(f"{where(image.line, image.image)}: {image.reason}")
            self.count += 1
            if image.image not in self.seen:
                self.seen.add(image.image)
                tqdm.write(f"warning: skipping {where(image.line, image.image)}: {image.reason}", file=sys.stderr)


def cache_fits(datasets):
    """Whether the RAM caches of these MyDatasets take under a quarter of the machine's memory, counting one
    cache per process that torchrun starts on this machine."""
    needed = sum(cache_bytes(data.sizes, data.short_side) for data in datasets)
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return needed * processes_here < physical_memory() / 4


def cache_bytes(sizes, short_side):
    """RAM the decoded-image cache would take, images reduced to `short_side`."""
    return sum(3 * w * h * min(1.0, short_side / min(w, h)) ** 2 for w, h in sizes)


def collate_skipping_bad(batch):
    """Collate the good samples of a batch; return (images, labels, bad) where bad lists the BadImages.

    When every sample failed, images and labels are None.
    """
    good = [sample for sample in batch if not isinstance(sample[0], BadImage)]
    bad = [sample[0] for sample in batch if isinstance(sample[0], BadImage)]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad


def _ignore_signals_in_worker(worker_id):
    # Ctrl-C reaches the whole process group; the main process decides when to stop and shuts workers down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_options(workers, device, persistent=True):
    return dict(
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
        # Persistent workers keep their random state across epochs, which a resumed run cannot restore;
        # on CUDA the saved start-up time matters more than bitwise-exact augmentation on resume. Not with
        # --progressive: workers copy the transform when they start, so they must start with each epoch's size.
        persistent_workers=workers > 0 and device.type == "cuda" and persistent,
        worker_init_fn=_ignore_signals_in_worker if workers > 0 else None,
    )
