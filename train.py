"""Train an image classifier from a CSV of image paths and labels.

    python train.py                                      # the bundled sample in data/
    python train.py --csv labels.csv --root images --epochs 3
    torchrun --nproc_per_node=4 train.py --csv labels.csv --root images

A cleaned-up version of the classic ResNet training script: MyDataset from a CSV, RandomResizedCrop/flip for
training and Resize/CenterCrop for validation, a seeded split, resnet34 with its head replaced, Adam at 1e-4,
and a train/validate loop that keeps the best checkpoint. The stages read top to bottom: arguments, data,
model, optimizer, loop, checkpoint.
"""

import argparse
import difflib
import hashlib
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, WeightedRandomSampler
from torchvision.transforms import v2
from tqdm import tqdm

from dataset import (
    DataError,
    MyDataset,
    check_images,
    collate_skipping_bad,
    read_labels,
    resolve_image_path,
    sorted_class_names,
)

CHECKPOINT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "val_macro_f1"]
# Flags that may differ when a run is resumed; every other flag is taken from the checkpoint.
RESUMABLE_FLAGS = {"epochs", "workers", "device", "amp", "compile", "cache", "skip_bad_images", "patience"}
# Flags that --evaluate may take from the command line instead of the checkpoint: the data and the runtime.
EVALUATE_FLAGS = RESUMABLE_FLAGS | {"csv", "root", "val_csv", "val_root", "image_col", "label_col", "batch_size"}
HERE = Path(__file__).resolve().parent


class UsageError(Exception):
    """A bad flag or an impossible request. The message is meant for the user, as one line."""


class BadImageError(Exception):
    """An image failed to decode during training and --skip-bad-images is off."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where X says something the help text does not."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--csv", default=None, help="CSV with a header row: image path, label (default: the sample, data/labels.csv)"
    )
    data.add_argument(
        "--root", default=None, help="folder the CSV's image paths are relative to (default: the CSV's folder)"
    )
    data.add_argument("--image-col", default=None, help="column of image paths (default: 'image', or the first of two)")
    data.add_argument("--label-col", default=None, help="column of labels (default: 'label', or the second of two)")
    data.add_argument("--val-csv", default=None, help="separate validation CSV; replaces --val-split")
    data.add_argument("--val-root", default=None, help="folder the --val-csv paths are relative to (default: --root)")
    data.add_argument("--val-split", type=float, default=0.3, help="fraction of --csv held out for validation")
    data.add_argument(
        "--split",
        choices=["auto", "stratified", "random"],
        default="auto",
        help="stratified keeps each class's share in train and val; auto = stratified when every class has 2+ images",
    )
    data.add_argument(
        "--image-size", type=int, default=224, help="training crop size; validation resizes to size*256/224"
    )
    data.add_argument(
        "--workers", type=int, default=None, help="DataLoader worker processes (default: fitted to the cores)"
    )
    data.add_argument(
        "--cache",
        choices=["auto", "on", "off"],
        default="auto",
        help="decode images once into RAM; auto = when they take under a quarter of it",
    )
    data.add_argument(
        "--skip-bad-images", action="store_true", help="drop images that fail to decode instead of stopping"
    )
    data.add_argument(
        "--balanced-sampler", action="store_true", help="draw training images with equal weight per class"
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet34", help="any torchvision classification model name")
    model.add_argument(
        "--weights",
        default=None,
        help="pretrained weights: a torchvision name (DEFAULT, IMAGENET1K_V1) or a local .pth state dict",
    )
    model.add_argument("--freeze-backbone", action="store_true", help="train only the new classification head")
    model.add_argument(
        "--sync-bn", action="store_true", help="synchronise BatchNorm statistics across torchrun processes"
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, default=3, help="number of epochs")
    optim.add_argument("--batch-size", type=int, default=16, help="images per step (per process under torchrun)")
    optim.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam", help="optimizer")
    optim.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument(
        "--weight-decay", type=float, default=0.0, help="weight decay, not applied to biases and norm layers"
    )
    optim.add_argument(
        "--lr-schedule",
        choices=["none", "cosine", "step"],
        default="none",
        help="learning-rate schedule over the epochs (step: x0.1 every third of the run)",
    )
    optim.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear learning-rate warmup")
    optim.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing for the cross-entropy loss")
    optim.add_argument(
        "--class-weights",
        choices=["none", "balanced"],
        default="none",
        help="balanced = weight the loss by inverse class frequency",
    )
    optim.add_argument(
        "--best-metric", choices=["acc", "macro_f1", "loss"], default="acc", help="what best.pt is best at"
    )
    optim.add_argument(
        "--patience", type=int, default=0, help="stop after this many epochs without a new best (0 = never)"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps")
    run.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "off"],
        default="auto",
        help="mixed precision; auto = bf16 where the device supports it, fp16 on older GPUs",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    run.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and augmentation")
    run.add_argument("--output-dir", default=None, help="run directory (default: a new runs/expN)")
    run.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        help="continue a run from a checkpoint (alone: the run directory's last.pt)",
    )
    run.add_argument(
        "--evaluate",
        default=None,
        metavar="CHECKPOINT",
        help="only evaluate a checkpoint on the validation data and write the report",
    )
    return parser


def check_args(args):
    if args.csv is None:  # the bundled sample, so that `python train.py` works out of the box
        args.csv, args.root = str(HERE / "data" / "labels.csv"), args.root or str(HERE / "data" / "images")
    if args.root is None:
        args.root = str(Path(args.csv).parent)
    positive = {
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--lr": args.lr,
        "--image-size": args.image_size,
    }
    for flag, value in positive.items():
        if not value > 0 or not math.isfinite(value):
            raise UsageError(f"{flag} must be positive, got {value}")
    if not 0 < args.val_split < 1:
        raise UsageError(f"--val-split must be between 0 and 1, got {args.val_split}")
    for flag, value in {
        "--weight-decay": args.weight_decay,
        "--momentum": args.momentum,
        "--warmup-epochs": args.warmup_epochs,
        "--patience": args.patience,
        "--workers": args.workers or 0,
    }.items():
        if not value >= 0:
            raise UsageError(f"{flag} must not be negative, got {value}")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.image_size < 16:
        raise UsageError(f"--image-size must be at least 16, got {args.image_size}")


# ----------------------------------------------------------------------------------------------- device


def choose_device(name, local_rank=None):
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        index = local_rank if local_rank is not None and device.index is None else (device.index or 0)
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
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else None


def default_workers(device, world_size):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores_per_process = max(1, cores // world_size)
    if device.type == "cpu":
        # The model trains on these same cores and needs ~50x the loader's time per image; measured on 2 cores,
        # loading in the main process beats 1 or 2 worker processes by 10-27% (benchmarks/benchmark.py).
        return 0
    return min(8, cores_per_process)


# ------------------------------------------------------------------------------------------------- data


def build_transforms(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_size=None):
    """Train: RandomResizedCrop + flip. Val: Resize + CenterCrop. Both end in uint8 tensors.

    Normalisation to float happens on the device (see `to_device`), so batches cross to it as uint8.
    """
    resize_size = resize_size or int(image_size * 256 / 224)
    train = v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )
    val = v2.Compose(
        [
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ]
    )
    return {"train": train, "val": val}


def split_samples(samples, val_split, seed, method):
    """Hold out `val_split` of the rows for validation, the same way for the same seed and CSV.

    Stratified keeps each class's share in both parts; random is the original script's random_split.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = samples["label"].value_counts()
    if method == "auto":
        method = "stratified" if counts.min() >= 2 else "random"
    is_val = np.zeros(len(samples), dtype=bool)
    if method == "random":
        order = torch.randperm(len(samples), generator=generator).numpy()
        train_size = int(len(samples) * (1 - val_split))
        is_val[order[train_size:]] = True
    else:
        for label in sorted(counts.index):
            rows = np.flatnonzero(samples["label"].to_numpy() == label)
            order = rows[torch.randperm(len(rows), generator=generator).numpy()]
            val_size = min(len(rows) - 1, max(1, round(len(rows) * val_split))) if len(rows) > 1 else 0
            is_val[order[:val_size]] = True
    return samples[~is_val].reset_index(drop=True), samples[is_val].reset_index(drop=True), method


def load_samples(args):
    """Read the CSV(s), choose the classes and the split, and check every image before training starts."""
    samples = read_labels(args.csv, args.image_col, args.label_col)
    class_names = sorted_class_names(samples["label"])
    if len(class_names) < 2:
        raise DataError(f"{args.csv}: only one class ({class_names[0]!r}); a classifier needs at least 2")
    if args.val_csv:
        train_samples, split_method = samples, "separate CSV"
        val_samples = read_labels(args.val_csv, args.image_col, args.label_col)
        unknown = sorted(set(val_samples["label"]) - set(class_names))
        if unknown:
            raise DataError(f"{args.val_csv}: labels not among the training classes: {', '.join(unknown[:5])}")
        image_sizes = check_images(train_samples, args.root, args.csv)
        image_sizes += check_images(val_samples, args.val_root or args.root, args.val_csv)
        train_files = {resolve_image_path(args.root, p) for p in train_samples["image"]}
        shared = sum(resolve_image_path(args.val_root or args.root, p) in train_files for p in val_samples["image"])
        if shared:
            print(
                f"warning: {shared} of the {len(val_samples)} --val-csv images are also in --csv; "
                "validation accuracy will look better than it is",
                file=sys.stderr,
            )
        return train_samples, val_samples, class_names, split_method, image_sizes

    train_samples, val_samples, split_method = split_samples(samples, args.val_split, args.seed, args.split)
    if len(train_samples) < 2 or len(val_samples) == 0:  # BatchNorm cannot train on a single image
        left = {0: "no training images", 1: "1 training image"}.get(len(train_samples), "no validation images")
        raise DataError(
            f"{args.csv}: --val-split {args.val_split} leaves {left} out of {len(samples)}; "
            "add images or change --val-split"
        )
    # One check of the whole CSV in line order, so one error counts every bad file wherever it was split to.
    size_of = dict(zip(samples["image"], check_images(samples, args.root, args.csv)))
    image_sizes = [size_of[image] for part in (train_samples, val_samples) for image in part["image"]]
    return train_samples, val_samples, class_names, split_method, image_sizes


def split_digest(train_samples, val_samples):
    """A fingerprint of the split, so a resumed run can tell that it trains on the same images."""
    text = "\n".join(f"{p}\t{label}\ttrain" for p, label in zip(train_samples["image"], train_samples["label"]))
    text += "\n" + "\n".join(f"{p}\t{label}\tval" for p, label in zip(val_samples["image"], val_samples["label"]))
    return hashlib.sha256(text.encode()).hexdigest()


def _ignore_signals_in_worker(worker_id):
    # Ctrl-C reaches the whole process group; the main process decides when to stop and shuts workers down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataloaders(args, train_samples, val_samples, class_names, transforms, device, image_sizes, rank, world_size):
    train_set = MyDataset(train_samples, args.root, class_names, transforms["train"])
    val_set = MyDataset(val_samples, args.val_root or args.root, class_names, transforms["val"])
    # Each process on a machine holds its own cache.
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cache_size = cache_bytes(image_sizes, args.image_size) * processes_here
    use_cache = args.cache == "on" or (args.cache == "auto" and cache_size < physical_memory() / 4)
    if use_cache:
        # Training images keep enough resolution for RandomResizedCrop's larger crops; validation images get
        # exactly their validation Resize, so cached and uncached validation see the same pixels.
        train_cap = 2 * args.image_size
        train_set.fill_cache(lambda im: im if min(im.size) <= train_cap else v2.functional.resize(im, train_cap))
        val_set.fill_cache(transforms["val"].transforms[0])

    workers = default_workers(device, world_size) if args.workers is None else args.workers
    generator = torch.Generator()  # seeded at the start of every epoch by seed_epoch
    if world_size > 1:
        if args.balanced_sampler:
            raise UsageError("--balanced-sampler does not work under torchrun yet; use --class-weights balanced")
        train_sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed)
    elif args.balanced_sampler:
        class_counts = np.bincount(train_set.targets, minlength=len(class_names))
        sample_weights = 1.0 / class_counts[train_set.targets]
        train_sampler = WeightedRandomSampler(sample_weights, len(train_set), generator=generator)
    else:
        train_sampler = None
    train_loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        generator=generator,
        # A last batch of a single image breaks BatchNorm in training; the shuffle changes what is left out.
        drop_last=len(train_sampler or train_set) > args.batch_size,
        **loader_options(workers, device),
    )
    # Every validation image is evaluated exactly once, on exactly one rank (no padding duplicates).
    val_shard = Subset(val_set, range(rank, len(val_set), world_size)) if world_size > 1 else val_set
    val_loader = DataLoader(val_shard, 2 * args.batch_size, **loader_options(workers, device))
    return train_loader, val_loader, workers, use_cache


def loader_options(workers, device):
    return dict(
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
        # Persistent workers keep their random state across epochs, which a resumed run cannot restore;
        # on CUDA the saved start-up time matters more than bitwise-exact augmentation on resume.
        persistent_workers=workers > 0 and device.type == "cuda",
        worker_init_fn=_ignore_signals_in_worker if workers > 0 else None,
    )


def cache_bytes(image_sizes, image_size):
    """RAM the decoded-image cache would take, images capped at twice the crop size."""
    cap = 2 * image_size
    return sum(3 * w * h * min(1.0, cap / min(w, h)) ** 2 for w, h in image_sizes)


def physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown (Windows): never cache automatically


# ------------------------------------------------------------------------------------------------ model


def build_model(model_name, num_classes, weights=None, freeze_backbone=False):
    """A torchvision classification model with its head replaced for `num_classes`, after loading weights."""
    known = torchvision.models.list_models(module=torchvision.models)
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise UsageError(f"--model {model_name}: not a torchvision classification model; {hint}")
    # Auxiliary heads (googlenet, inception_v3) only matter for their own training recipe.
    kwargs = {"aux_logits": False} if model_name in ("googlenet", "inception_v3") else {}
    if weights is None:
        model = torchvision.models.get_model(model_name, **kwargs)
    elif is_weights_file(weights):
        model = torchvision.models.get_model(model_name, **kwargs)
        load_weights_file(model, weights, model_name)
    else:
        model = torchvision.models.get_model(model_name, weights=torchvision_weights(model_name, weights), **kwargs)
    head_name = replace_head(model, num_classes)
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head_name + ".")
    return model


def is_weights_file(weights):
    """A --weights value is a local file (rather than a torchvision weights name such as DEFAULT)."""
    return weights.endswith((".pth", ".pt", ".bin")) or "/" in weights or os.sep in weights or os.path.isfile(weights)


def check_input_size(model, model_name, image_size):
    """Fail now, not after the first batch, when --image-size is too small for the architecture."""
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as e:
        raise UsageError(
            f"--image-size {image_size} does not fit {model_name} ({_one_line(e)[:100]}); use a larger size"
        ) from None


def torchvision_weights(model_name, weights):
    enum = torchvision.models.get_model_weights(model_name)
    name = weights.split(".")[-1]
    if name not in enum.__members__:
        choices = ", ".join(enum.__members__)
        raise UsageError(f"--weights {weights}: {model_name} has no such weights; choose from {choices} or a .pth file")
    weight = enum[name]
    try:
        weight.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise UsageError(
            f"--weights {weights}: could not download {weight.url} ({_one_line(e)}); "
            "download it elsewhere and pass the .pth file"
        ) from None
    return weight


def load_weights_file(model, path, model_name):
    """Load a local state dict (or one of our checkpoints) into `model`, ignoring only a different head."""
    state = load_checkpoint(path, "--weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: not a state dict of tensors")
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    own = model.state_dict()
    head_name = _head(model)[0]
    for key in [k for k in state if k.startswith(head_name + ".") and k in own and state[k].shape != own[k].shape]:
        del state[key]  # the head is replaced anyway; a different class count must not stop fine-tuning
    missing = [k for k in own if k not in state and not k.startswith(head_name + ".")]
    unexpected = [k for k in state if k not in own and not k.startswith(("AuxLogits.", "aux1.", "aux2."))]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = (
            (missing and f"missing {missing[0]}")
            or (unexpected and f"unexpected {unexpected[0]}")
            or (f"shape of {mismatched[0]}")
        )
        raise UsageError(f"--weights {path}: does not fit {model_name} ({detail}); is it for another --model?")
    model.load_state_dict(state, strict=False)


def _head(model):
    """The final classification layer: the last Linear, or squeezenet's 1x1 convolution."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


def replace_head(model, num_classes):
    name, old = _head(model)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return name


def build_optimizer(model, args):
    # As the original document shows: weight decay on weights only, never on biases and norm layers.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step on CUDA; on the CPU, measured no faster than the default (foreach).
    fused = True if next(model.parameters()).is_cuda else None
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, fused=fused)
    optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=args.lr, fused=fused)


def build_scheduler(optimizer, args, steps_per_epoch):
    """Per-step learning-rate factor: linear warmup, then constant, cosine or step decay."""
    warmup_steps = args.warmup_epochs * steps_per_epoch
    total_steps = max(1, args.epochs * steps_per_epoch)

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if args.lr_schedule == "step":
            return 0.1 ** min(2, int(progress * 3))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(args, train_targets, num_classes, device):
    weight = None
    if args.class_weights == "balanced":
        counts = np.bincount(train_targets, minlength=num_classes)
        weight = torch.tensor(len(train_targets) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)
        weight = weight.to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


# ------------------------------------------------------------------------------------------------- loop


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves last.pt and exits 130/143."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self):
        # After a stop the process is on its way out: further signals are ignored, so that a second Ctrl-C
        # during shutdown cannot turn the clean exit into a KeyboardInterrupt or a death by signal.
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_IGN if self.signum is not None else handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving last.pt", file=sys.stderr)
        self.signum = signum


def to_device(images, device, mean, std, channels_last):
    """uint8 NCHW batch to a normalised float batch on `device`."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.float().div_(255).sub_(mean).div_(std)


class BadImageLog:
    """Reports each undecodable image once, and counts them per epoch."""

    def __init__(self, skip):
        self.skip = skip
        self.seen = set()
        self.count = 0

    def handle(self, bad):
        for image in bad:
            if not self.skip:
                raise BadImageError(f"line {image.line} {image.image}: {image.reason}")
            self.count += 1
            if image.image not in self.seen:
                self.seen.add(image.image)
                tqdm.write(f"warning: skipping line {image.line} {image.image}: {image.reason}", file=sys.stderr)


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, ctx, epoch, stop):
    """One pass over the training data. Loss and accuracy add up on the device and are read only when the
    progress bar refreshes, so the loop never waits for the GPU between steps."""
    model.train()
    device = ctx["device"]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start, last_refresh = 0, time.perf_counter(), time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{ctx['epochs']}", leave=False, disable=not ctx["main"], dynamic_ncols=True)
    for step, (images, labels, bad) in enumerate(bar):
        ctx["bad_images"].handle(bad)
        if images is None and ctx["world_size"] > 1:  # DDP needs every process in every step
            raise BadImageError(
                f"every image of a batch failed to decode, the first: line {bad[0].line} {bad[0].image}"
            )
        if images is not None:
            images = to_device(images, device, ctx["mean"], ctx["std"], ctx["channels_last"])
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=ctx["amp"], enabled=ctx["amp"] is not None):
                logits = model(images)
                loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            scheduler.step()
        if ctx["main"] and time.perf_counter() - last_refresh > 1.0 and seen:
            last_refresh = time.perf_counter()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", img_s=f"{seen / (last_refresh - start):.1f}")
        if stop_agreed(stop, step, ctx):
            break
    bar.close()
    totals = all_reduce(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]), ctx)
    loss_total, correct_total, count = totals.tolist()
    return {"train_loss": loss_total / max(count, 1), "train_acc": correct_total / max(count, 1), "count": count}


def stop_agreed(stop, step, ctx):
    """Whether every process has been asked to stop. Under torchrun, ranks agree every 8 steps."""
    if ctx["world_size"] == 1:
        return stop.signum is not None
    if step % 8 != 7:
        return False
    flag = torch.tensor([0 if stop.signum is None else stop.signum], device=ctx["device"])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and stop.signum is None:
        stop.signum = int(flag.item())
    return bool(flag.item())


@torch.inference_mode()
def evaluate(model, loader, ctx, num_classes):
    """Loss, confusion matrix (rows: true class, columns: predicted) and top-k hits over every validation image.

    The loss is plain cross-entropy, without class weights or smoothing, so it compares across settings.
    """
    model.eval()
    device = ctx["device"]
    ks = [k for k in (2, 5) if k < num_classes]
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    topk_hits = torch.zeros(len(ks), device=device, dtype=torch.long)
    for images, labels, bad in tqdm(loader, desc="validate", leave=False, disable=not ctx["main"]):
        ctx["bad_images"].handle(bad)
        if images is None:
            continue
        images = to_device(images, device, ctx["mean"], ctx["std"], ctx["channels_last"])
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=ctx["amp"], enabled=ctx["amp"] is not None):
            logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
        for i, k in enumerate(ks):
            topk_hits[i] += (logits.topk(k).indices == labels[:, None]).any(1).sum()
    loss_sum = all_reduce(loss_sum, ctx)
    confusion = all_reduce(confusion, ctx).view(num_classes, num_classes).cpu()
    topk_hits = all_reduce(topk_hits, ctx).cpu()
    count = int(confusion.sum())
    return {
        "val_loss": loss_sum.item() / max(count, 1),
        "val_acc": confusion.trace().item() / max(count, 1),
        "val_macro_f1": macro_f1(confusion),
        "confusion": confusion,
        "topk_acc": {k: hits / max(count, 1) for k, hits in zip(ks, topk_hits.tolist())},
        "count": count,
    }


def per_class_scores(confusion):
    """Precision, recall and F1 per class; 0 where a class has no support or no predictions."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = true_positive / predicted.clamp(min=1)
    recall = true_positive / support.clamp(min=1)
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    return support, precision, recall, f1


def macro_f1(confusion):
    """Mean F1 over the classes present in the evaluated data."""
    support, _, _, f1 = per_class_scores(confusion)
    present = support > 0
    return f1[present].mean().item() if present.any() else 0.0


def classification_report(stats, class_names):
    """Rows of report.csv: one per class, macro and weighted averages (over classes present), accuracy, top-k."""
    support, precision, recall, f1 = per_class_scores(stats["confusion"])
    rows = [
        dict(label=name, support=int(n), precision=p, recall=r, f1=f)
        for name, n, p, r, f in zip(class_names, support.tolist(), precision.tolist(), recall.tolist(), f1.tolist())
    ]
    present = support > 0
    if present.any():
        weights = support[present] / support[present].sum()
        for name, average in (
            ("macro avg", lambda x: x[present].mean()),
            ("weighted avg", lambda x: (x[present] * weights).sum()),
        ):
            rows.append(
                dict(
                    label=name,
                    support=int(support.sum()),
                    precision=average(precision).item(),
                    recall=average(recall).item(),
                    f1=average(f1).item(),
                )
            )
    rows.append(dict(label="accuracy", support=stats["count"], precision="", recall="", f1=stats["val_acc"]))
    for k, accuracy in stats["topk_acc"].items():
        rows.append(dict(label=f"top{k} accuracy", support=stats["count"], precision="", recall="", f1=accuracy))
    return rows


def write_report(output_dir, stats, class_names, title):
    """Print the per-class report and confusion matrix, and save them as report.csv and confusion_matrix.csv."""
    rows = classification_report(stats, class_names)
    width = max(12, *(len(row["label"]) for row in rows))
    print(f"\n{title}: {stats['count']} images, loss {stats['val_loss']:.3f}")
    print(f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}")
    for row in rows:
        cells = [
            f"{row[c]:9.3f}" if isinstance(row[c], float) else f"{row[c]:>9}" for c in ("precision", "recall", "f1")
        ]
        print(f"{row['label']:>{width}}  {'  '.join(cells)}  {row['support']:>7}")
    confusion = stats["confusion"].tolist()
    cell = max(5, *(len(name) for name in class_names))
    print(
        f"\nconfusion matrix (rows: true, columns: predicted)\n{'':>{width}}  "
        + "  ".join(f"{n:>{cell}}" for n in class_names)
    )
    for name, counts in zip(class_names, confusion):
        print(f"{name:>{width}}  " + "  ".join(f"{c:>{cell}}" for c in counts))
    write_csv_atomically(output_dir / "report.csv", ["label", "support", "precision", "recall", "f1"], rows)
    matrix_rows = [
        {"true\\predicted": name, **dict(zip(class_names, counts))} for name, counts in zip(class_names, confusion)
    ]
    write_csv_atomically(output_dir / "confusion_matrix.csv", ["true\\predicted", *class_names], matrix_rows)


def all_reduce(tensor, ctx):
    if ctx["world_size"] > 1:
        dist.all_reduce(tensor)
    return tensor


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, fsynced, then renamed over `path`.

    A crash or a full disk at any moment leaves either the old file or the new one, never a broken one.
    """
    write_atomically(path, lambda f: torch.save(state, f))


def write_atomically(path, write):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UsageError(f"could not write {path}: {e.strerror or e}; earlier files there are intact") from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_csv_atomically(path, header, rows):
    lines = [",".join(header)] + [",".join(_csv_field(row[c]) for c in header) for row in rows]
    write_atomically(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def _csv_field(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def load_checkpoint(path, flag):
    """torch.load with weights_only=True: a file holding anything but tensors and plain values is refused."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing a file
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if path.stat().st_size == 0:
            reason = "the file is empty"
        elif "GLOBAL" in str(e) or "Unsupported global" in str(e):
            reason = "not a plain checkpoint of tensors; Python objects in it are not loaded, for safety"
        elif "Weights only load failed" in str(e):
            reason = "not a PyTorch checkpoint of tensors (its data is damaged, or unsafe to load)"
        else:
            reason = "truncated, or not a PyTorch checkpoint at all"
        raise UsageError(f"{flag} {path}: {reason}") from None


def _one_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def make_output_dir(output_dir):
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {output_dir}: cannot create it ({e.strerror or e})") from None


def remove_stale_temp_files(output_dir):
    for stale in Path(output_dir).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def choose_output_dir(args):
    if args.output_dir:
        return Path(args.output_dir)
    runs = HERE / "runs" if Path.cwd() == HERE else Path("runs")
    numbers = [int(m.group(1)) for p in runs.glob("exp*") if (m := re.fullmatch(r"exp(\d+)", p.name))]
    if args.resume == "last":
        if numbers:
            return runs / f"exp{max(numbers)}"
    elif args.resume:
        return Path(args.resume).parent
    return runs / f"exp{max(numbers, default=0) + 1}"


# ------------------------------------------------------------------------------------------------- main


def setup_distributed():
    """(rank, local_rank, world_size) from torchrun's environment; (0, None, 1) without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, None, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size


def explicit_flags(argv):
    """The flags the user actually typed (not their defaults)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def apply_saved_args(args, saved_args, typed, may_differ):
    """Take a saved run's settings: flags in `may_differ` typed now override them; others must not differ.

    The device is never taken from the saved run: it is a property of the machine the run continues on.
    """
    for name, value in saved_args.items():
        if name in ("resume", "output_dir", "evaluate", "device") or not hasattr(args, name):
            continue
        if name in typed:
            if name not in may_differ and getattr(args, name) != value:
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"{flag} {getattr(args, name)} differs from the saved run's {value}; drop it or start a new run"
                )
            continue
        setattr(args, name, value)


def main(args, argv=None):
    rank, local_rank, world_size = setup_distributed()
    check_args(args)
    device = choose_device(args.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    typed = explicit_flags(argv or [])
    if args.evaluate:
        return evaluate_checkpoint(args, typed, device)

    output_dir = choose_output_dir(args)
    if world_size > 1:  # every rank must agree on one run directory
        shared = [str(output_dir)]
        dist.broadcast_object_list(shared, src=0)
        output_dir = Path(shared[0])
    checkpoint = find_resume_checkpoint(args, output_dir, typed)
    if checkpoint is None and any((output_dir / name).exists() for name in ("last.pt", "best.pt")):
        raise UsageError(
            f"--output-dir {output_dir} already holds a run; add --resume to continue it, or choose another directory"
        )

    train_samples, val_samples, class_names, split_method, image_sizes = load_samples(args)
    digest = split_digest(train_samples, val_samples)
    if checkpoint is not None and checkpoint.get("split_digest") != digest:
        raise UsageError(f"--resume: {args.csv} no longer gives the split this run trained on; start a new run")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    mean, std, resize_size = preprocessing_of(args)
    ctx = make_context(args, device, mean, std, rank, world_size)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # input sizes are fixed: pick the fastest kernels once
    model = build_model(args.model, len(class_names), None if checkpoint else args.weights, args.freeze_backbone)
    check_input_size(model, args.model, args.image_size)
    transforms = build_transforms(args.image_size, mean, std, resize_size)
    train_loader, val_loader, workers, cached = build_dataloaders(
        args, train_samples, val_samples, class_names, transforms, device, image_sizes, rank, world_size
    )
    model.to(device, memory_format=torch.channels_last if ctx["channels_last"] else torch.contiguous_format)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=ctx["amp"] == torch.float16)
    loss_fn = build_loss(args, train_loader.dataset.targets, len(class_names), device)
    if checkpoint is not None:
        load_training_state(checkpoint, model, optimizer, scheduler, scaler)

    if ctx["main"]:
        make_output_dir(output_dir)
        remove_stale_temp_files(output_dir)
        write_split(output_dir, train_samples, val_samples)
        print_setup(args, ctx, train_samples, val_samples, class_names, split_method, workers, cached, output_dir)
    meta = dict(
        class_names=class_names,
        model_name=args.model,
        image_size=args.image_size,
        mean=list(mean),
        std=list(std),
        resize_size=resize_size or int(args.image_size * 256 / 224),
        args=plain_args(args),
        split_digest=digest,
        version=CHECKPOINT_VERSION,
    )
    training = dict(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loss_fn=loss_fn,
        train_loader=train_loader,
        val_loader=val_loader,
        meta=meta,
        output_dir=output_dir,
    )
    status, best = fit(args, training, ctx, checkpoint)
    if status == 0 and best["epoch"]:
        report_best_model(training, ctx, best)
    return status


def make_context(args, device, mean, std, rank=0, world_size=1):
    """What every step needs to know about where and how it runs."""
    return dict(
        device=device,
        amp=choose_amp(args.amp, device),
        # Measured faster for convnets on CPU (fp32 and bf16) and CUDA; MPS gains nothing from it.
        channels_last=device.type in ("cpu", "cuda"),
        main=rank == 0,
        world_size=world_size,
        epochs=args.epochs,
        mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(std, device=device).view(1, 3, 1, 1),
        bad_images=BadImageLog(args.skip_bad_images),
    )


def find_resume_checkpoint(args, output_dir, typed):
    """The checkpoint --resume continues from, with the run's own settings applied to `args`; None to start fresh.

    `--resume` alone with no last.pt yet starts a new run, so a restart can rerun the very same command line.
    """
    if not args.resume:
        return None
    path = output_dir / "last.pt" if args.resume == "last" else Path(args.resume)
    if args.resume == "last" and not path.exists():
        return None
    checkpoint = load_our_checkpoint(path, "--resume")
    apply_saved_args(args, checkpoint["args"], typed, RESUMABLE_FLAGS)
    check_args(args)
    return checkpoint


def print_setup(args, ctx, train_samples, val_samples, class_names, split_method, workers, cached, output_dir):
    precision = "fp32" if ctx["amp"] is None else str(ctx["amp"]).removeprefix("torch.") + " autocast"
    processes = f", {ctx['world_size']} processes" if ctx["world_size"] > 1 else ""
    print(
        f"device {ctx['device']}{processes}, {precision}{', channels_last' if ctx['channels_last'] else ''}, "
        f"loader workers {workers}{', RAM cache' if cached else ''}"
    )
    counts = train_samples["label"].value_counts()
    print(
        f"{len(train_samples)} train / {len(val_samples)} val images ({split_method} split), "
        f"{len(class_names)} classes: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in class_names)
    )
    global_batch = f" (global {args.batch_size * ctx['world_size']})" if ctx["world_size"] > 1 else ""
    print(
        f"{args.model}{' from ' + args.weights if args.weights else ''}, {args.optimizer} lr {args.lr:g}, "
        f"batch {args.batch_size}{global_batch}, {args.epochs} epochs -> {output_dir}"
    )


def fit(args, training, ctx, checkpoint):
    """The train/validate loop. Saves best.pt and last.pt each epoch; stops cleanly on a signal or a bad image.

    Returns (exit status, best) where best records the best epoch and its validation accuracy.
    """
    model, optimizer, scheduler, scaler = (training[k] for k in ("model", "optimizer", "scheduler", "scaler"))
    train_loader, val_loader, output_dir = training["train_loader"], training["val_loader"], training["output_dir"]
    train_model = wrap_model(model, args, ctx)
    start_epoch = checkpoint["epoch"] if checkpoint else 0
    history = list(checkpoint["history"]) if checkpoint else []
    best = dict(checkpoint["best"]) if checkpoint else {"score": None, "epoch": 0, "val_acc": 0.0}
    if start_epoch and ctx["main"]:
        print(f"resuming after epoch {start_epoch}")

    def save(name, epoch):
        if ctx["main"]:
            state = dict(
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                epoch=epoch,
                best=dict(best),
                best_acc=best["val_acc"],
                history=list(history),
                **training["meta"],
            )
            save_checkpoint(state, output_dir / name)

    stop = StopRequest()
    stop.install()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            if stop.signum is not None:  # asked to stop during validation or a save
                break
            seed_epoch(args.seed, epoch, train_loader)
            started = time.perf_counter()
            ctx["bad_images"].count = 0
            train_stats = train_one_epoch(
                train_model, train_loader, training["loss_fn"], optimizer, scheduler, scaler, ctx, epoch, stop
            )
            if stop.signum is not None:
                break
            if not math.isfinite(train_stats["train_loss"]):
                raise UsageError(
                    f"training loss became {train_stats['train_loss']} in epoch {epoch}; lower --lr "
                    "(last.pt keeps the previous epoch)"
                )
            val_stats = evaluate(model, val_loader, ctx, len(training["meta"]["class_names"]))
            row = dict(
                epoch=epoch,
                train_loss=train_stats["train_loss"],
                train_acc=train_stats["train_acc"],
                val_loss=val_stats["val_loss"],
                val_acc=val_stats["val_acc"],
                lr=optimizer.param_groups[0]["lr"],
                seconds=time.perf_counter() - started,
                val_macro_f1=val_stats["val_macro_f1"],
            )
            history.append(row)
            score = {"acc": row["val_acc"], "macro_f1": row["val_macro_f1"], "loss": -row["val_loss"]}[args.best_metric]
            improved = best["score"] is None or score > best["score"]
            if improved:
                best.update(score=score, epoch=epoch, val_acc=row["val_acc"])
                save("best.pt", epoch)  # before last.pt: a crash in between repeats this epoch, best.pt included
            save("last.pt", epoch)
            if ctx["main"]:
                write_csv_atomically(output_dir / "metrics.csv", METRIC_COLUMNS, history)
                print_epoch(row, args.epochs, improved, ctx["bad_images"].count)
            if args.patience and epoch - best["epoch"] >= args.patience:
                if ctx["main"]:
                    print(f"no better {args.best_metric} for {args.patience} epochs: stopping early")
                break
        if stop.signum is not None:
            # The weights reached so far (--resume restarts this epoch), saved while the handlers still catch a
            # second signal, so it cannot break the save.
            save("last.pt", epoch - 1)
            if ctx["main"]:
                launcher = f"torchrun --nproc_per_node={ctx['world_size']}" if ctx["world_size"] > 1 else "python"
                command = f"{launcher} train.py --output-dir {output_dir} --resume"
                print(f"saved {output_dir / 'last.pt'}; continue with: {command}", file=sys.stderr)
            return 128 + stop.signum, best
    except BadImageError as e:
        save("last.pt", epoch - 1)  # restarts this epoch on --resume
        saved = "last.pt saved" if ctx["main"] else "last.pt holds the previous epoch"
        raise DataError(f"{e}; fix or remove it, or pass --skip-bad-images ({saved})") from None
    finally:
        stop.uninstall()
    return 0, best


def seed_epoch(seed, epoch, train_loader):
    """Derive every random number of an epoch (shuffle, augmentation, dropout) from (seed, epoch, rank).

    A resumed run then continues exactly as the uninterrupted one would, with no generator state to save,
    under torchrun too.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    epoch_seed = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    train_loader.generator.manual_seed(epoch_seed)
    if isinstance(train_loader.sampler, DistributedSampler):
        train_loader.sampler.set_epoch(epoch)


def wrap_model(model, args, ctx):
    """The module the training steps call: DDP under torchrun, compiled with --compile."""
    if ctx["world_size"] > 1:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device = ctx["device"]
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model


def print_epoch(row, epochs, improved, skipped):
    print(
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}  "
        f"val_loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}{' *best' if improved else ''}  "
        f"{row['seconds']:.1f}s{f'  skipped {skipped} bad images' if skipped else ''}",
        flush=True,
    )


def report_best_model(training, ctx, best):
    """Evaluate best.pt's weights on the validation set: the per-class report and confusion matrix."""
    output_dir = training["output_dir"]
    if ctx["world_size"] > 1:
        dist.barrier()  # rank 0 has finished writing best.pt
    model = training["model"]
    model.load_state_dict(load_checkpoint(output_dir / "best.pt", "best.pt")["model"])
    stats = evaluate(model, training["val_loader"], ctx, len(training["meta"]["class_names"]))
    if ctx["main"]:
        print(f"best val_acc {best['val_acc']:.3f} at epoch {best['epoch']}: {output_dir / 'best.pt'}")
        write_report(
            output_dir, stats, training["meta"]["class_names"], f"validation report of {output_dir / 'best.pt'}"
        )


def evaluate_checkpoint(args, typed, device):
    """--evaluate: the report for a saved checkpoint on validation data, with its own classes and preprocessing.

    The data is --val-csv when given, else the validation part of the run's split of its --csv.
    """
    checkpoint = load_our_checkpoint(Path(args.evaluate), "--evaluate")
    apply_saved_args(args, checkpoint["args"], typed, EVALUATE_FLAGS)
    class_names = list(checkpoint["class_names"])
    if args.val_csv:
        csv_path, root = args.val_csv, args.val_root or args.root
        samples = read_labels(csv_path, args.image_col, args.label_col)
    else:
        csv_path, root = args.csv, args.root
        _, samples, _ = split_samples(
            read_labels(csv_path, args.image_col, args.label_col), args.val_split, args.seed, args.split
        )
    unknown = sorted(set(samples["label"]) - set(class_names))
    if unknown:
        raise DataError(f"{csv_path}: labels the checkpoint does not know: {', '.join(unknown[:5])}")
    check_images(samples, root, csv_path)
    ctx = make_context(args, device, checkpoint["mean"], checkpoint["std"])
    model = model_from_checkpoint(checkpoint, f"--evaluate {args.evaluate}", device, ctx["channels_last"])
    val_transform = build_transforms(checkpoint["image_size"], resize_size=checkpoint["resize_size"])["val"]
    val_set = MyDataset(samples, root, class_names, val_transform)
    workers = default_workers(device, 1) if args.workers is None else args.workers
    loader = DataLoader(val_set, 2 * args.batch_size, **loader_options(workers, device))
    stats = evaluate(model, loader, ctx, len(class_names))
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.evaluate).parent
    make_output_dir(output_dir)
    write_report(output_dir, stats, class_names, f"evaluation of {args.evaluate} on {csv_path}")
    return 0


def model_from_checkpoint(checkpoint, source, device, channels_last):
    """The trained model a checkpoint holds, on `device`, ready for evaluation."""
    model = build_model(checkpoint["model_name"], len(checkpoint["class_names"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"{source}: weights do not fit {checkpoint['model_name']} ({_one_line(e)[:150]})") from None
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return model.eval()


def load_our_checkpoint(path, flag):
    checkpoint = load_checkpoint(path, flag)
    if not isinstance(checkpoint, dict) or not {"model", "args", "class_names"} <= checkpoint.keys():
        raise UsageError(f"{flag} {path}: not a checkpoint written by train.py")
    return checkpoint


def preprocessing_of(args):
    """Normalisation and validation resize: the pretrained weights' own when they define them, else ImageNet's."""
    mean, std, resize_size = IMAGENET_MEAN, IMAGENET_STD, None
    if args.weights and not is_weights_file(args.weights):
        try:
            preset = torchvision.models.get_model_weights(args.model)[args.weights.split(".")[-1]].transforms()
            mean, std = tuple(preset.mean), tuple(preset.std)
            resize_size = round(preset.resize_size[0] * args.image_size / preset.crop_size[0])
        except (KeyError, AttributeError, ValueError):
            pass
    return mean, std, resize_size


def load_training_state(checkpoint, model, optimizer, scheduler, scaler):
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"--resume: the checkpoint does not fit this model ({_one_line(e)[:150]})") from None


def plain_args(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def write_split(output_dir, train_samples, val_samples):
    rows = [
        dict(image=p, label=label, split="train") for p, label in zip(train_samples["image"], train_samples["label"])
    ]
    rows += [dict(image=p, label=label, split="val") for p, label in zip(val_samples["image"], val_samples["label"])]
    write_csv_atomically(output_dir / "split.csv", ["image", "label", "split"], rows)


def run_cli(argv=None):
    """Parse the command line and run; user mistakes become one `error:` line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = get_args_parser().parse_args(argv)
        return main(args, argv)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started or after it ended: nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        print(
            f"error: out of device memory at --batch-size {args.batch_size}; lower --batch-size or --image-size",
            file=sys.stderr,
        )
        return 2
    except RuntimeError:
        if not dist.is_initialized():
            raise
        # Under torchrun, a process that stopped (bad input, a signal) breaks the others' collectives.
        print(
            f"error: process {dist.get_rank()} stopped because another one failed; see its error above", file=sys.stderr
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_cli())
