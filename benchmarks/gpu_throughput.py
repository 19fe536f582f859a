"""Training throughput of train.py's own path at several batch sizes, and its DataLoader alone.

    python benchmarks/gpu_throughput.py                                   # resnet34, 224 px, batch 64/128/256, CUDA
    python benchmarks/gpu_throughput.py --device cpu --image-size 32 --batch-sizes 8 --images 32 --rounds 1

For each batch size: benchmark.Ours sets up train.py's stages as train.main() does (get_args_parser,
build_datasets with the RAM cache on, build_dataloaders, build_model, build_optimizer, build_scheduler,
build_loss, make_context: bf16 autocast, channels_last on CPU and CUDA), trains a few untimed warmup steps
(cudnn picks its kernels), then times whole train_one_epoch epochs and epochs of the DataLoader alone, on
synthetic ~256 px JPEGs written to a temporary folder. The medians over the rounds are printed, one line a
batch size. DataLoader workers default to one per core (train.py's default stops at 8).
"""

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import benchmark  # benchmarks/benchmark.py: the synthetic images, train.py's path (Ours) and the timing helpers
import torch

import devices


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu, ...")
    parser.add_argument("--image-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-sizes", default="64,128,256", help="comma-separated batch sizes")
    parser.add_argument("--images", type=int, default=4096, help="synthetic training images (about 256x256 JPEGs)")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per batch size (train, then loader)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed training steps before the rounds")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: one per core)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the images, the model and the shuffling")
    return parser


def measure(csv_path, root, opts, batch_size):
    """(train img/s, loader-alone img/s, description) at one batch size: medians over opts.rounds epochs."""
    settings = argparse.Namespace(
        image_size=opts.image_size, batch_size=batch_size, device=opts.device, amp="bf16", cache="on",
        seed=opts.seed, workers=opts.workers, compile=False,
    )  # fmt: skip
    ours = benchmark.Ours(csv_path, root, settings)
    ours.activate()
    ours.epoch(max_steps=opts.warmup_steps)
    train_rates, loader_rates = [], []
    for _ in range(opts.rounds):
        train_rates.append(benchmark.rate(*benchmark.timed(ours.epoch, ours.device)))
        loader_rates.append(benchmark.rate(*benchmark.timed(lambda: benchmark.drain(ours.loader), ours.device)))
    return statistics.median(train_rates), statistics.median(loader_rates), ours.describe


def main(opts):
    benchmark.load_train()  # puts the repository root on sys.path

    opts.workers = devices.cpu_cores() if opts.workers is None else opts.workers
    batch_sizes = [int(size) for size in opts.batch_sizes.split(",")]
    device = torch.device(opts.device)
    print(benchmark.machine_line(device, torch.get_num_threads()), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as folder:
        started = time.perf_counter()
        csv_path, root = benchmark.make_images(Path(folder), opts.images, opts.seed)
        print(f"data: {opts.images} synthetic JPEGs, written in {time.perf_counter() - started:.0f} s", flush=True)
        for batch_size in batch_sizes:
            train_rate, loader_rate, describe = measure(csv_path, root, opts, batch_size)
            if batch_size == batch_sizes[0]:
                print(f"resnet34 at {opts.image_size} px: {describe}", flush=True)
            print(f"batch {batch_size}: train {train_rate:.1f} img/s, loader alone {loader_rate:.1f} img/s", flush=True)
            gc.collect()  # the previous loader's workers and cache, and its model's memory, before the next size
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
