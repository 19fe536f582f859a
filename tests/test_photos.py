"""Large photos: images decoded reduced to the size the transform needs (load_image's short_side), the RAM cache
filled on all cores with the same pixels, and the image check in parallel."""

import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

import dataset
import devices
from dataset import BadImage, MyDataset
from errors import DataError
from images import check_images, load_image


def smooth_image(width=600, height=400, seed=0):
    """An RGB image of smooth colour fields: reduced and full-size decodes of it differ only a little."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def quadrants(width=600, height=400):
    """Red, green / blue, white quadrants: any rotation or flip moves a colour to another corner."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    pixels[: height // 2, width // 2 :] = (0, 255, 0)
    pixels[height // 2 :, : width // 2] = (0, 0, 255)
    pixels[height // 2 :, width // 2 :] = (255, 255, 255)
    return Image.fromarray(pixels)


def difference(a, b):
    """Mean absolute difference of two same-sized images."""
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape
    return np.abs(a - b).mean()


def full_then_resized(path, size):
    """The reference: the whole image decoded, then resized (bilinear, antialiased) to `size`."""
    return load_image(path).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture
def spy(monkeypatch):
    """Records the size of every image Image.resize and Image.reduce are called on, and reduce's factor
    (clear it after making the test's images)."""
    calls = []
    resize, reduce = Image.Image.resize, Image.Image.reduce

    def spy_resize(self, size, *args, **kwargs):
        calls.append(("resize", self.size, tuple(size)))
        return resize(self, size, *args, **kwargs)

    def spy_reduce(self, factor, *args, **kwargs):
        calls.append(("reduce", self.size, factor))
        return reduce(self, factor, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy_resize)
    monkeypatch.setattr(Image.Image, "reduce", spy_reduce)
    return calls


def samples_of(names):
    return pd.DataFrame({"image": names, "label": ["a"] * len(names), "line": range(2, len(names) + 2)})


# ---------------------------------------------------------------------------------------------- reduction


def test_jpeg_is_draft_decoded_at_the_smallest_dct_scale_then_resized(tmp_path, spy):
    path = tmp_path / "photo.jpg"
    smooth_image().save(path, quality=95)
    spy.clear()
    image = load_image(path, short_side=90)
    assert image.size == (135, 90) and image.mode == "RGB"
    # 1/4 is the smallest scale keeping 90 px (1/8 gives 75x50): the decoder delivered 150x100, not 600x400.
    assert spy == [("resize", (150, 100), (135, 90))]
    assert difference(image, full_then_resized(path, (135, 90))) < 3


def test_jpeg_draft_scale_that_fits_exactly_needs_no_resize(tmp_path, spy):
    path = tmp_path / "photo.jpg"
    smooth_image().save(path, quality=95)
    spy.clear()
    assert load_image(path, short_side=50).size == (75, 50)  # 1/8 scale
    assert spy == []


def test_jpeg_draft_is_not_used_without_short_side(tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    smooth_image().save(path, quality=95)
    loaded = []
    load = JpegImageFile.load

    def spy_load(self):
        loaded.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImageFile, "load", spy_load)
    assert load_image(path).size == (600, 400)
    assert load_image(path, short_side=100).size == (150, 100)
    assert loaded[0] == (600, 400) and loaded[-1] == (150, 100)


def test_png_is_reduced_by_an_integer_factor_then_resized(tmp_path, spy):
    path = tmp_path / "scan.png"
    smooth_image().save(path)
    spy.clear()
    image = load_image(path, short_side=90)
    assert image.size == (135, 90)
    # reduce keeps at least twice 90 px: factor 2 (400 -> 200), then the exact resize.
    assert spy == [("reduce", (600, 400), 2), ("resize", (300, 200), (135, 90))]
    assert difference(image, full_then_resized(path, (135, 90))) < 3


def test_small_images_are_never_enlarged(tmp_path):
    path = tmp_path / "small.png"
    smooth_image(60, 40).save(path)
    assert load_image(path, short_side=90).size == (60, 40)
    assert np.array_equal(np.asarray(load_image(path, short_side=90)), np.asarray(load_image(path)))


def test_exif_rotated_photo_comes_out_upright(tmp_path):
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape; shown rotated 90 degrees clockwise
    quadrants().save(path, quality=95, exif=exif)
    upright = load_image(path)  # ImageOps.exif_transpose on the whole image
    assert upright.size == (400, 600)
    image = load_image(path, short_side=90)
    assert image.size == (90, 135)
    assert difference(image, upright.resize((90, 135), Image.Resampling.BILINEAR)) < 6
    # Each corner keeps its colour: top left of the upright photo is the stored bottom left, blue.
    assert np.abs(np.asarray(image, dtype=int)[5, 5] - (0, 0, 255)).max() < 30


# --------------------------------------------------------------------------------- modes with short_side


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "xray.png"
    Image.fromarray(np.full((400, 600), 40000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path, short_side=90)
    assert image.size == (135, 90)
    assert (np.asarray(image) == round(40000 / 257)).all()  # 156; a plain convert gives 255


def test_palette_transparency_becomes_white(tmp_path):
    path = tmp_path / "icon.png"
    indices = np.zeros((400, 600), dtype=np.uint8)
    indices[:, 300:] = 1  # the right half is transparent
    image = Image.fromarray(indices, mode="P")
    image.putpalette([200, 30, 30, 0, 0, 0] + [0, 0, 0] * 254)
    image.save(path, transparency=1)
    pixels = np.asarray(load_image(path, short_side=90))
    assert pixels.shape == (90, 135, 3)
    assert (pixels[:, :60] == (200, 30, 30)).all() and (pixels[:, 75:] == 255).all()


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "RGBA", "1", "P"])
def test_other_modes_match_the_full_decode(tmp_path, mode):
    path = tmp_path / ("image.jpg" if mode in ("CMYK", "L") else "image.png")
    image = smooth_image()
    if mode in ("LA", "RGBA"):
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    image.convert(mode).save(path)
    reduced = load_image(path, short_side=90)
    assert reduced.size == (135, 90) and reduced.mode == "RGB"
    assert difference(reduced, full_then_resized(path, (135, 90))) < (12 if mode == "1" else 3)


# -------------------------------------------------------------------------------------------------- cache


@pytest.fixture
def photos(tmp_path):
    """Images of several kinds and sizes under tmp_path/photos; returns (root, names)."""
    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    smooth_image(seed=1).save(root / "landscape.jpg", quality=90)
    quadrants(640, 480).save(root / "rotated.jpg", quality=90, exif=exif)
    smooth_image(400, 600, seed=2).save(root / "portrait.png")
    Image.fromarray(np.linspace(0, 65535, 500 * 300).reshape(300, 500).astype(np.uint16)).save(root / "deep.png")
    smooth_image(60, 40, seed=3).save(root / "small.jpg")
    smooth_image(512, 384, seed=4).convert("CMYK").save(root / "print.jpg")
    names = ["landscape.jpg", "rotated.jpg", "portrait.png", "deep.png", "small.jpg", "print.jpg"]
    return root, names


def test_cached_pixels_are_the_uncached_pixels(photos):
    root, names = photos
    uncached = MyDataset(samples_of(names), root, ["a"], short_side=90)
    cached = MyDataset(samples_of(names), root, ["a"], short_side=90)
    cached.fill_cache()
    for index in range(len(names)):
        image, _ = cached[index]
        assert isinstance(image, Image.Image), image
        assert np.array_equal(np.asarray(image), np.asarray(uncached[index][0])), names[index]
        assert min(image.size) == (40 if names[index] == "small.jpg" else 90)


def test_cache_is_sized_from_the_headers_exactly(photos):
    """Every image fits its planned place (rotated ones too): nothing is left to read from disk, no slack."""
    root, names = photos
    data = MyDataset(samples_of(names), root, ["a"], short_side=90)
    data.fill_cache()
    pixels, offsets, shapes = data.cache
    sizes = [load_image(root / name, 90).size for name in names]
    assert shapes == [(h, w, 3) for w, h in sizes]
    assert pixels.numel() == offsets[-1] == sum(3 * w * h for w, h in sizes)
    assert pixels.is_shared()


def test_parallel_cache_fill_matches_serial(photos, monkeypatch):
    root, names = photos
    names = names * 3  # more images than threads
    caches = {}
    for threads in (1, 4):
        monkeypatch.setattr(dataset, "decode_threads", lambda threads=threads: threads)
        data = MyDataset(samples_of(names), root, ["a"], short_side=90)
        data.fill_cache()
        caches[threads] = data.cache
    (serial, serial_offsets, serial_shapes), (parallel, offsets, shapes) = caches[1], caches[4]
    assert torch_equal(serial, parallel) and offsets == serial_offsets and shapes == serial_shapes
    for index, name in enumerate(names):
        expected = np.asarray(load_image(root / name, 90))
        assert np.array_equal(parallel[offsets[index] : offsets[index + 1]].numpy(), expected.reshape(-1)), name


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_bad_images_are_reported_by_name_from_the_cache(photos):
    root, names = photos
    whole = (root / "landscape.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    (root / "garbage.jpg").write_bytes(b"not an image at all")
    names = ["truncated.jpg", *names, "garbage.jpg"]
    data = MyDataset(samples_of(names), root, ["a"], short_side=90)
    data.fill_cache()
    assert data.cache[2][0] == (0, 0, 3) and data.cache[2][-1] == (0, 0, 3)
    for index, name in enumerate(names):
        image, _ = data[index]
        if name in ("truncated.jpg", "garbage.jpg"):
            assert isinstance(image, BadImage) and image.image == name and image.line == index + 2
        else:
            assert isinstance(image, Image.Image), image


# ------------------------------------------------------------------------------------------- check_images


def test_check_images_returns_sizes_in_order(tmp_path):
    names = []
    for index in range(40):
        name = f"img_{index:02d}.png"
        Image.new("RGB", (10 + index, 20)).save(tmp_path / name)
        names.append(name)
    assert check_images(samples_of(names), tmp_path, "labels.csv") == [(10 + i, 20) for i in range(40)]


def test_check_images_names_the_bad_files(tmp_path):
    names = []
    for index in range(20):
        name = f"img_{index:02d}.png"
        Image.new("RGB", (8, 8)).save(tmp_path / name)
        names.append(name)
    (tmp_path / "img_07.png").write_bytes(b"junk")
    names.insert(12, "missing.png")
    with pytest.raises(DataError) as error:
        check_images(samples_of(names), tmp_path, "labels.csv")
    message = str(error.value)
    assert "2 of 21 images are unusable" in message
    assert message.index("line 9 img_07.png (not an image Pillow can read)") < message.index(
        "line 14 missing.png (no such file)"
    )


# ------------------------------------------------------------------------------------------ map_in_threads


def test_map_in_threads_keeps_the_order():
    def slow_for_small(value):
        time.sleep(0.002 * (50 - value))  # later items finish first
        return value * value

    assert list(devices.map_in_threads(slow_for_small, range(50), 4)) == [v * v for v in range(50)]


def test_map_in_threads_stops_at_an_error():
    started = []

    def fail_at_three(value):
        started.append(value)
        if value == 3:
            raise ValueError("three")
        return value

    results = devices.map_in_threads(fail_at_three, range(10_000), 2)
    with pytest.raises(ValueError, match="three"):
        list(results)
    assert len(started) < 100  # the rest were never submitted, or cancelled
