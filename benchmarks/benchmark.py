"""Training throughput: the original tutorial script's loop (A) against train.py's own training path (B).

    python benchmarks/benchmark.py                    # 96 synthetic JPEGs, 224 px, batch 16, 3 rounds
    python benchmarks/benchmark.py --workers 0        # flags for B are passed to train.py's own parser
    python benchmarks/benchmark.py --amp off --rounds 5
    python benchmarks/benchmark.py --photos 4032x3024 # photo mode: large JPEGs (see run_photos), ~10 min on 2 cores

Photo mode times the data side on phone-sized photos instead: the loader alone per core (one thread, no loader
processes) for the original pipeline (PIL open + convert, v1 RandomResizedCrop + flip + ToTensor + Normalize)
and ours (MyDataset with short_side = 2 x --image-size, presets.train_transform), both uncached
and each measured in a fresh process; the same on small images; the cache fill on one thread and on all; and
whole `python train.py` runs (RUN_ARGS) on the photos against the same photos downsized 4x, --cache on and off.

Both sides train resnet34 on the same synthetic JPEG images, written to a temporary folder with a labels CSV
and decoded by each side's own dataset. One round is one epoch of A, then one epoch of B (each side keeps
its model and optimizer across rounds, as a real run does), then one epoch of each side's DataLoader alone
(no model). Epochs include DataLoader worker start-up, which both sides pay every epoch on the CPU. The
medians over the rounds are reported.

A, "original": a copy of the tutorial's main() (the seed document in shared/seed/): torchvision.transforms v1
RandomResizedCrop + flip + ToTensor + Normalize on PIL images decoded from disk every epoch,
nw = min(cpu_count, batch_size, 8) workers, resnet34 with its fc replaced, fp32, Adam 1e-4,
optimizer.zero_grad() and `running_loss += loss.item()` every step. Left out: the random 70/30 split (both
sides train on all --images images), the progress print and the validation pass.

B, "ours": train.py's get_args_parser / build_transforms / build_datasets (MyDataset and its RAM cache
decision) / build_dataloaders / build_model / build_optimizer / build_scheduler / build_loss / train_one_epoch,
with the Context (amp, channels_last) from devices.make_context, as train.main() uses them.
"""

import argparse
import contextlib
import csv
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageChops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository's library modules, as train.py sees them

import devices  # noqa: E402
import models  # noqa: E402
import presets  # noqa: E402
import splits  # noqa: E402
from labels import read_image_sets, read_labels, sorted_class_names  # noqa: E402

NUM_CLASSES = 5  # the tutorial's nn.Linear(in_channel, 5)


def load_train():
    """train.py, imported from the repository root (sys.path is changed here, not when this file is imported)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import train

    return train


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--image-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--images", type=int, default=96, help="synthetic training images (about 256x256 JPEGs)")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per side, interleaved A, B, A, B, ...")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps per side before round 1")
    parser.add_argument("--seed", type=int, default=0, help="seed for the images, the models and the shuffling")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for both sides; None leaves torch's default"
    )
    ours = parser.add_argument_group("passed to train.py for B (train.py's defaults when left out)")
    ours.add_argument("--workers", type=int, default=None, help="DataLoader worker processes; None: train.py's default")
    ours.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="mixed precision")
    ours.add_argument("--cache", choices=["auto", "on", "off"], default="auto", help="decode images once into RAM")
    ours.add_argument("--compile", action="store_true", help="torch.compile the model (compiled during warmup)")
    photos = parser.add_argument_group("photo mode: large JPEGs instead of the training comparison")
    photos.add_argument(
        "--photos",
        type=photo_size,
        default=None,
        metavar="WxH",
        help="photo size, e.g. 4032x3024: loader img/s per core, cache fill and whole train.py runs on such photos",
    )
    photos.add_argument("--photo-count", type=int, default=48, help="synthetic photos in photo mode")
    photos.add_argument(
        "--whole-runs", type=int, default=2, help="repeats of each whole train.py run (the fastest counts)"
    )
    return parser


def photo_size(text):
    """'4032x3024' -> (4032, 3024), for --photos."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 4032x3024, got {text!r}") from None
    if min(width, height) < 64:
        raise argparse.ArgumentTypeError(f"photos of at least 64x64, got {text!r}")
    return width, height


# ------------------------------------------------------------------------------------------------- data


def make_images(folder, count, seed=0, size=256):
    """`count` JPEGs of about size x size (smooth colour fields plus noise) and a labels CSV with 5 integer labels.

    Returns (csv_path, image_root).
    """
    rng = np.random.default_rng(seed)
    root = Path(folder) / "images"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        width, height = (int(size * rng.uniform(0.9, 1.1)) for _ in range(2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-25, 26, smooth.shape), 0, 255).astype(np.uint8)
        name = f"img_{index:04d}.jpg"
        Image.fromarray(pixels).save(root / name, quality=90)
        rows.append((name, index % NUM_CLASSES))
    csv_path = Path(folder) / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    return csv_path, root


# ------------------------------------------------------------------------------------------- A: original


class OriginalDataset(torch.utils.data.Dataset):
    """The tutorial's MyDataset (its code is not shown there): CSV rows, PIL open + convert('RGB'), transform."""

    def __init__(self, csv_path, root, transform=None):
        import pandas as pd

        frame = pd.read_csv(csv_path)
        self.images = list(frame["image"])
        self.labels = [int(label) for label in frame["label"]]
        self.root = str(root)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = Image.open(os.path.join(self.root, self.images[index])).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def original_transform(image_size):
    """The tutorial's training transform: torchvision.transforms v1 on PIL images, float output."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


class Original:
    """The tutorial's main(), set up once; `epoch` runs its training loop once over the data."""

    name = "original"

    def __init__(self, csv_path, root, image_size, batch_size, device):
        import torch.optim as optim
        import torchvision.models as models

        dataset = OriginalDataset(csv_path, root, transform=original_transform(image_size))
        nw = min([os.cpu_count(), batch_size if batch_size > 1 else 0, 8])  # number of workers
        self.workers = nw
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=nw)
        net = models.resnet34()
        in_channel = net.fc.in_features
        net.fc = nn.Linear(in_channel, NUM_CLASSES)
        net.to(device)
        self.net = net
        self.device = device
        self.loss_function = nn.CrossEntropyLoss()
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = optim.Adam(params, lr=0.0001)
        self.describe = f"fp32, loader workers {nw}, decode from disk every epoch"

    def activate(self):
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False  # the tutorial leaves it at PyTorch's default

    def epoch(self, max_steps=None):
        net, device, optimizer = self.net, self.device, self.optimizer
        net.train()
        running_loss = 0.0
        seen = 0
        for step, data in enumerate(self.loader):
            images, labels = data
            optimizer.zero_grad()
            logits = net(images.to(device))
            loss = self.loss_function(logits, labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            seen += len(labels)
            if max_steps and step + 1 >= max_steps:
                break
        return seen


# ------------------------------------------------------------------------------------------------ B: ours


class StopAfterSteps:
    """Stands in for train.StopRequest to end an epoch early (warmup) in a single process."""

    def __init__(self, steps):
        self.left = steps

    def agreed(self, step, ctx):
        self.left -= 1
        return self.left <= 0


class Ours:
    """train.py's training path, set up the way train.main() sets it up; `epoch` is one train_one_epoch."""

    name = "ours"

    def __init__(self, csv_path, root, opts):
        train = load_train()
        self.train = train
        argv = ["--csv", str(csv_path), "--root", str(root), "--model", "resnet34"]
        argv += ["--image-size", str(opts.image_size), "--batch-size", str(opts.batch_size), "--device", opts.device]
        argv += ["--amp", opts.amp, "--cache", opts.cache, "--seed", str(opts.seed)]
        argv += ["--workers", str(opts.workers)] if opts.workers is not None else []
        argv += ["--compile"] if opts.compile else []
        args = train.get_args_parser().parse_args(argv)
        train.check_args(args)
        device = devices.choose_device(args.device)
        train.settle_defaults(args, device, checkpoint=None)
        self.args = args
        self.device = device

        # Every image trains (no split, like A), checked as train.py checks them; a one-image validation set only
        # because build_datasets wants one.

        everything = splits.checked(read_image_sets(csv=args.csv, root=args.root)[0])
        class_names = sorted_class_names(everything.samples["label"])
        val_set = everything._replace(samples=everything.samples.head(1))

        # train.main()'s stages, in its order.
        torch.manual_seed(args.seed)
        mean, std, resize_size = presets.weights_preprocessing(args.model, args.weights, args.image_size)
        self.ctx = devices.make_context(device, args.amp, mean, std)
        amp, channels_last = self.ctx.amp_dtype, self.ctx.channels_last
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # the "caching" progress bar
            train_data, val_data, _ = train.build_datasets(args, everything, val_set, None, class_names, resize_size)
        cached = train_data.cache is not None
        self.setup_seconds = time.perf_counter() - started
        workers = devices.loader_workers(args.workers, device)
        self.loader, _ = train.build_dataloaders(args, train_data, val_data, self.ctx, workers)
        model = models.build_model(args.model, len(class_names), None, args.freeze_backbone)
        model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.optimizer = train.build_optimizer(model, args)
        self.scheduler = train.build_scheduler(self.optimizer, args, len(self.loader))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.loss_fn = train.build_loss(args, train_data.targets, len(class_names), device)
        self.model = torch.compile(model) if args.compile else model
        self.epochs_run = 0
        self.amp, self.channels_last, self.workers, self.cached = amp, channels_last, workers, cached
        self.describe = (
            f"{'fp32' if amp is None else str(amp).removeprefix('torch.') + ' autocast'}"
            f"{', channels_last' if channels_last else ''}, loader workers {workers}"
            f"{f', RAM cache (filled in {self.setup_seconds:.1f} s, untimed)' if cached else ', no RAM cache'}"
            f"{', torch.compile' if args.compile else ''}"
        )

    def activate(self):
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as train.main() sets it

    def epoch(self, max_steps=None):
        self.epochs_run += 1
        stop = StopAfterSteps(max_steps) if max_steps else self.train.StopRequest()  # never installed
        # train_one_epoch's progress bar (and its once-a-second loss read) runs as in training; its text is dropped.
        with contextlib.redirect_stderr(io.StringIO()):
            stats = self.train.train_one_epoch(
                self.model,
                self.loss_fn,
                self.optimizer,
                self.scheduler,
                self.scaler,
                self.loader,
                self.ctx,
                self.args,
                self.epochs_run,
                self.train.BadImageLog(skip=False),
                stop,
            )
        return int(stats["count"])


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(run, device):
    """(images, seconds) for run(), which returns how many images it processed."""
    synchronize(device)
    started = time.perf_counter()
    images = run()
    synchronize(device)
    return images, time.perf_counter() - started


def drain(loader):
    """One epoch of a DataLoader alone; the number of images it delivered."""
    images = 0
    for batch in loader:
        images += len(batch[0]) if batch[0] is not None else 0
    return images


def machine_line(device, threads):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    import torchvision

    return (
        f"machine: {device} {name}, {cores} usable cores (os.cpu_count {os.cpu_count()}), torch threads {threads}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}{load}"
    )


def rate(images, seconds):
    return images / seconds if seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------ photo mode

# The whole-run comparison: a short train.py run (its CLI only), small enough that decoding shows in its time.
RUN_ARGS = ["--model", "resnet18", "--image-size", "64", "--epochs", "2", "--device", "cpu", "--batch-size", "16"]


def make_photos(folder, count, size, seed=0):
    """`count` synthetic phone photos of `size` (colour fields, texture and sensor noise, JPEG quality 90; every
    4th stored sideways with EXIF orientation 6, as phones store portraits) and the same photos downsized 4x,
    each set with a labels CSV of 5 integer labels.

    Returns ((csv_path, root) of the photos, (csv_path, root) of the downsized copies).
    """
    rng = np.random.default_rng(seed)
    width, height = size
    small = (width // 4, height // 4)
    sets = [Path(folder) / "photos", Path(folder) / "downsized"]
    for path in sets:
        (path / "images").mkdir(parents=True)
    # One frame of sensor noise, shifted for each photo: drawing 12 MP of noise per photo takes longer than decoding.
    noise = Image.fromarray(rng.integers(0, 9, (height, width), dtype=np.uint8)).convert("RGB")
    rows = []
    for index in range(count):
        fields = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
        texture = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
        scene = Image.blend(
            fields.resize(small, Image.Resampling.BICUBIC), texture.resize(small, Image.Resampling.BILINEAR), 0.3
        )
        shifted = ImageChops.offset(noise, int(rng.integers(width)), int(rng.integers(height)))
        photo = ImageChops.add(scene.resize((width, height), Image.Resampling.BILINEAR), shifted, offset=-4)
        extra = {}
        if index % 4 == 3:
            exif = Image.Exif()
            exif[0x0112] = 6
            extra["exif"] = exif
        name = f"photo_{index:03d}.jpg"
        photo.save(sets[0] / "images" / name, quality=90, **extra)
        photo.resize(small, Image.Resampling.BILINEAR, reducing_gap=2.0).save(
            sets[1] / "images" / name, quality=90, **extra
        )
        rows.append((name, index % NUM_CLASSES))
    for path in sets:
        with open(path / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label"])
            writer.writerows(rows)
    return [(path / "labels.csv", path / "images") for path in sets]


def loader_rate(data, batch_size, seed, collate_fn=None, epochs=1):
    """(images per wall-clock second, images per CPU second of this process) of `epochs` epochs of a
    single-process DataLoader (no workers) over `data`. With one torch thread the CPU time is one core's, and
    other processes on the machine barely change it; the wall clock shows them."""
    loader = torch.utils.data.DataLoader(
        data,
        batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )
    cpu_started = time.process_time()
    images, seconds = timed(lambda: sum(drain(loader) for _ in range(epochs)), torch.device("cpu"))
    return rate(images, seconds), rate(images, time.process_time() - cpu_started)


def side_loader_rate(side, csv_path, root, image_size, batch_size, seed, short_side=None, epochs=1):
    """loader_rate of one side on one thread: "original" (OriginalDataset, the tutorial's v1 transform) or "ours"
    (MyDataset with `short_side`, presets.train_transform), both uncached."""
    torch.set_num_threads(1)
    import dataset

    if side == "original":
        data, collate = OriginalDataset(csv_path, root, original_transform(image_size)), None
    else:
        samples = read_labels(csv_path)
        transform = presets.train_transform(image_size)
        data = dataset.MyDataset(samples, root, sorted_class_names(samples["label"]), transform, short_side)
        collate = dataset.collate_skipping_bad
    for index in range(min(2, len(data))):  # first calls: lazy imports, Pillow's plugins
        data[index]
    return loader_rate(data, batch_size, seed, collate, epochs)


def fresh_loader_rate(*args):
    """side_loader_rate(*args) in a new Python process, so that both sides start from the same state: in a
    long-lived process the C allocator may keep or give back the memory of freed full-size photos, and that
    alone moves the original's rate by up to 1.7x (it keeps it with MALLOC_MMAP_THRESHOLD_=67108864
    MALLOC_TRIM_THRESHOLD_=268435456)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(side_loader_rate, *args).result()


def cache_fill(make_data, threads=None):
    """(seconds, dataset) for fill_cache on a fresh dataset; `threads` overrides devices.decode_threads."""

    chosen = devices.decode_threads
    if threads is not None:
        devices.decode_threads = lambda: threads
    try:
        data = make_data()
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
            data.fill_cache()
        return time.perf_counter() - started, data
    finally:
        devices.decode_threads = chosen


def whole_run(csv_path, root, cache, output_dir):
    """(wall-clock seconds, CPU seconds on all its threads) of `python train.py` (RUN_ARGS) on a CSV, as a user
    runs it, start-up included."""
    command = [sys.executable, str(REPO / "train.py"), "--csv", str(csv_path), "--root", str(root), *RUN_ARGS]
    command += ["--cache", cache, "--output-dir", str(output_dir)]
    cpu_before = children_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    cpu_seconds = children_cpu_seconds() - cpu_before
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"train.py exited {done.returncode}: {last}")
    return seconds, cpu_seconds


def children_cpu_seconds():
    """CPU seconds used by the finished child processes so far (nan where unknown: Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_photos(opts):
    """Photo mode: what decoding large photos costs the original pipeline and ours."""
    import dataset

    torch.set_num_threads(opts.threads or 1)  # per core: one thread, no loader processes
    size, short_side = opts.photos, 2 * opts.image_size
    with tempfile.TemporaryDirectory(prefix="benchmark-photos-") as folder:
        started = time.perf_counter()
        (csv_path, root), (small_csv, small_root) = make_photos(folder, opts.photo_count, size, opts.seed)
        made = time.perf_counter() - started
        megabytes = statistics.mean(path.stat().st_size for path in root.iterdir()) / 1e6
        print(machine_line(torch.device("cpu"), torch.get_num_threads()), flush=True)
        print(
            f"data: {opts.photo_count} synthetic {size[0]}x{size[1]} JPEG photos ({megabytes:.1f} MB each, every 4th "
            f"EXIF-rotated) and the same downsized to {size[0] // 4}x{size[1] // 4}, written in {made:.0f} s",
            flush=True,
        )

        samples = read_labels(csv_path)
        class_names = sorted_class_names(samples["label"])
        train_transform = presets.train_transform(opts.image_size)

        def ours(short=short_side, data_samples=samples, data_root=root):
            return dataset.MyDataset(data_samples, data_root, class_names, train_transform, short_side=short)

        # 1. The loader alone, per core: original (full decode, v1 transforms) against ours (reduced decode),
        # interleaved, each epoch in a fresh process.
        rates = {"original": [], "ours": []}
        for round_index in range(1, opts.rounds + 1):
            for side in rates:
                args = (side, csv_path, root, opts.image_size, opts.batch_size, opts.seed + round_index, short_side)
                rates[side].append(fresh_loader_rate(*args))
            print(
                f"round {round_index}/{opts.rounds}: loader img/s per core on the photos (wall clock, CPU time): "
                f"original {rates['original'][-1][0]:.2f}, {rates['original'][-1][1]:.2f}; "
                f"ours {rates['ours'][-1][0]:.2f}, {rates['ours'][-1][1]:.2f}",
                flush=True,
            )
        original_rate, our_rate = (
            [statistics.median(value[kind] for value in rates[name]) for kind in (0, 1)]
            for name in ("original", "ours")
        )

        # Small images: nothing to reduce, so ours should be as fast with short_side as without.
        small_csv_256, small_root_256 = make_images(Path(folder) / "small256", opts.images, opts.seed)
        variants = {
            "original": ("original", None),
            "ours, no short_side": ("ours", None),
            f"ours, short_side {short_side}": ("ours", short_side),
        }
        small_rates = {name: [] for name in variants}
        for round_index in range(opts.rounds):
            for name, (side, short) in variants.items():
                args = (side, small_csv_256, small_root_256, opts.image_size, opts.batch_size, opts.seed + round_index)
                small_rates[name].append(fresh_loader_rate(*args, short, 10)[1])  # 10 epochs: a second or more
        small_rates = {name: statistics.median(values) for name, values in small_rates.items()}

        # 2. The cache fill, ours, on one thread and on all.
        threads = devices.decode_threads()
        serial_seconds, _ = cache_fill(ours, threads=1)
        fill_seconds, cached = cache_fill(ours)
        cached_mb = cached.cache[0].numel() / 1e6
        del cached

        print()
        print(
            f"photos {size[0]}x{size[1]}, {opts.photo_count} JPEGs, "
            f"training crop {opts.image_size} (short_side {short_side}):"
        )
        for kind, label in ((1, "CPU time"), (0, "wall clock")):
            print(
                f"  loader per core (median of {opts.rounds}, {label}): original {original_rate[kind]:.2f} img/s, "
                f"ours {our_rate[kind]:.2f} img/s, ours/original {our_rate[kind] / original_rate[kind]:.2f}x"
            )
        print(
            f"  loader per core (CPU time), {opts.images} ~256 px JPEGs, 10 epochs: "
            + ", ".join(f"{name} {value:.0f} img/s" for name, value in small_rates.items())
        )
        print(
            f"  cache fill (ours, {cached_mb:.0f} MB): {fill_seconds:.2f} s on {threads} threads "
            f"({opts.photo_count / fill_seconds:.1f} img/s), "
            f"{serial_seconds:.2f} s on 1 ({serial_seconds / fill_seconds:.2f}x)",
            flush=True,
        )

        # 3. Whole train.py runs, photos against the downsized copies, cache on and off; the fastest of the
        # interleaved repeats (other processes on the cores only ever add time).
        runs = {}
        for attempt in range(opts.whole_runs):
            for cache in ("on", "off"):
                for name, (run_csv, run_root) in (("photos", (csv_path, root)), ("downsized", (small_csv, small_root))):
                    output_dir = Path(folder) / f"run-{name}-{cache}-{attempt}"
                    seconds, cpu_seconds = whole_run(run_csv, run_root, cache, output_dir)
                    runs[cache, name] = min((seconds, cpu_seconds), runs.get((cache, name), (seconds, cpu_seconds)))
                    print(
                        f"    train.py --cache {cache} on the {name}: {seconds:.1f} s ({cpu_seconds:.1f} CPU s)",
                        flush=True,
                    )

    print(f"  whole run (python train.py {' '.join(RUN_ARGS)}), best of {opts.whole_runs}, photos / downsized copies:")
    for cache in ("on", "off"):
        (photos, photos_cpu), (downsized, downsized_cpu) = runs[cache, "photos"], runs[cache, "downsized"]
        print(
            f"    --cache {cache}: {photos:.1f} s / {downsized:.1f} s = {photos / downsized:.2f}x "
            f"(CPU time {photos_cpu:.1f} s / {downsized_cpu:.1f} s = {photos_cpu / downsized_cpu:.2f}x)"
        )
    if hasattr(os, "getloadavg"):
        print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes on these cores skew wall times)")
    return 0


def main(argv=None):
    parser = get_args_parser()
    opts = parser.parse_args(argv)
    for flag, value, least in (
        ("--images", opts.images, 1),
        ("--rounds", opts.rounds, 1),
        ("--warmup-steps", opts.warmup_steps, 0),
        ("--photo-count", opts.photo_count, 1),
        ("--whole-runs", opts.whole_runs, 1),
    ):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    train = load_train()
    try:
        return run_photos(opts) if opts.photos else run(opts)
    except (train.UsageError, train.DataError) as e:  # train.py's own one-line messages, e.g. for --device
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(opts):
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
        started = time.perf_counter()
        csv_path, root = make_images(folder, opts.images, opts.seed)
        made = time.perf_counter() - started
        ours = Ours(csv_path, root, opts)  # first: it validates the flags with train.py's own parser
        device = ours.device
        original = Original(csv_path, root, opts.image_size, opts.batch_size, device)
        sides = [original, ours]
        amp = "fp32" if ours.amp is None else str(ours.amp).removeprefix("torch.")
        print(machine_line(device, torch.get_num_threads()) + f", amp choice {amp}", flush=True)
        print(
            f"data: {opts.images} synthetic JPEGs of ~256x256 (written in {made:.1f} s), {NUM_CLASSES} classes, "
            f"image size {opts.image_size}, batch {opts.batch_size}, {len(original.loader)} steps per epoch, "
            f"warmup {opts.warmup_steps} steps per side, {opts.rounds} rounds"
        )
        for side in sides:
            print(f"{side.name:>8}: {side.describe}")

        for side in sides if opts.warmup_steps > 0 else []:
            side.activate()
            images, seconds = timed(lambda s=side: s.epoch(opts.warmup_steps), device)
            print(f"warmup {side.name}: {images} images in {seconds:.1f} s", flush=True)

        train_rates = {side.name: [] for side in sides}
        loader_rates = {side.name: [] for side in sides}
        for round_index in range(1, opts.rounds + 1):
            parts = []
            for side in sides:
                side.activate()
                images, seconds = timed(side.epoch, device)
                train_rates[side.name].append(rate(images, seconds))
                parts.append(f"{side.name} {train_rates[side.name][-1]:.2f} img/s ({seconds:.1f} s)")
            for side in sides:
                images, seconds = timed(lambda s=side: drain(s.loader), device)
                loader_rates[side.name].append(rate(images, seconds))
            loaders = ", ".join(f"{name} {rates[-1]:.1f}" for name, rates in loader_rates.items())
            print(
                f"round {round_index}/{opts.rounds}: train {'  '.join(parts)}  | loader only img/s: {loaders}",
                flush=True,
            )

        a, b = (statistics.median(train_rates[name]) for name in ("original", "ours"))
        la, lb = (statistics.median(loader_rates[name]) for name in ("original", "ours"))
        paired = statistics.median(rb / ra for ra, rb in zip(train_rates["original"], train_rates["ours"]))
        print(
            f"train img/s (median of {opts.rounds}): original (A) {a:.2f}, ours (B) {b:.2f}, B/A {b / a:.2f}x "
            f"(median of the per-round B/A: {paired:.2f}x)"
        )
        print(
            f"loader only img/s (median of {opts.rounds}): original {la:.1f}, ours {lb:.1f}, "
            f"ours/original {lb / la:.2f}x"
        )
        if hasattr(os, "getloadavg"):
            print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes on these cores skew all numbers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
