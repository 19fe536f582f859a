"""Where and how the training steps run: the device (--device), the autocast precision (--amp), the memory
layout, the normalisation constants on the device, the process's rank, and how many DataLoader workers fit.
train.py, predict.py and export.py all build their `Context` here, so a model runs the same way in each."""

import collections
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from errors import UsageError
from presets import channel_constants, normalize


@dataclass(frozen=True)
class Context:
    """Where and how the steps run, fixed for the whole run (see make_context)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool  # measured faster for convnets on CPU (fp32 and bf16) and CUDA; MPS gains nothing
    mean: torch.Tensor  # (1, 3, 1, 1) on the device: batches are normalised there
    std: torch.Tensor
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def show_bars(self):
        """Progress bars on rank 0's terminal only: in a log file every refresh would be written into it."""
        return self.is_main and sys.stderr.isatty()


def make_context(device, amp, mean, std, rank=0, world_size=1):
    mean, std = channel_constants(mean, device), channel_constants(std, device)
    channels_last = device.type in ("cpu", "cuda")
    return Context(device, choose_amp(amp, device), channels_last, mean, std, rank, world_size)


def choose_device(name):
    """The device --device names; under torchrun, a process's own GPU is the one of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device type; use auto, cpu, cuda or mps")
    return device


def choose_amp(requested, device):
    """The autocast dtype, or None for fp32: bf16 where the hardware does it natively, fp16 on older GPUs."""
    if requested == "off" or device.type == "mps":
        return None
    if requested in ("bf16", "fp16"):
        return torch.bfloat16 if requested == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else None


def loader_workers(requested, device, world_size=1):
    """--workers when given, else a default fitted to the device and the cores."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        # The model trains on these same cores and needs ~50x the loader's time per image; measured on 2 cores,
        # loading in the main process beats 1 or 2 worker processes by 10-27% (benchmarks/benchmark.py).
        return 0
    return min(8, max(1, cpu_cores() // world_size))


def cpu_cores():
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_threads():
    """Threads for decoding images: the cores this process may use, shared among the processes that torchrun
    starts on this machine. Pillow releases the GIL while it decodes and resizes."""
    return max(1, cpu_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def map_in_threads(function, items, threads):
    """Yield function(item) for each item, in order, computed on `threads` threads with a few items in flight
    per thread (not a future per item up front); an error or Ctrl-C cancels the ones not started."""
    pool = ThreadPoolExecutor(max(1, threads))
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown (Windows): never cache automatically


def to_device(images, ctx):
    """A uint8 NCHW batch as the normalised float batch the model takes, on the context's device and layout."""
    images = images.to(ctx.device, non_blocking=True)
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize(images, ctx.mean, ctx.std)
