"""Train an image classifier from a CSV of image paths and labels, or from folders named by class.

    python train.py                                      # the bundled sample in data/
    python train.py --csv labels.csv --root images --epochs 3
    python train.py --data flowers/                      # flowers/train/<class>/*.jpg, flowers/val/<class>/...
    python train.py --data flowers/ --nproc 4            # 4 processes (GPUs), as torchrun would start them

A cleaned-up version of the classic ResNet training script: MyDataset from a CSV or class folders,
RandomResizedCrop/flip for training and Resize/CenterCrop for validation, a seeded split, resnet34 with its
head replaced, Adam at 1e-4, and a train/validate loop that keeps the best checkpoint. The stages read top to
bottom: arguments, data, model, optimizer, one epoch and evaluation, main. The device and precision are chosen
in devices.py, the processes started in processes.py; what a run writes and reads back (checkpoints, reports,
pictures) is in run_files.py, the recipe's extras (augmentation, mixing, EMA, the LR finder) in recipe.py.
"""

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, WeightedRandomSampler
from tqdm import tqdm

import cam
import cli
import dataset
import decision
import duplicates
import metrics
import models
import plots
import presets
import recipe
import report
import run_files
import splits
import tracking
from cli import COUNT, FOLDS, FRACTION, IMAGE_SIZE, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, SMOOTHING
from dataset import BadImageLog, MyDataset, loader_options
from devices import choose_device, loader_workers, make_context, to_device
from errors import BadImageError, DataError, UsageError
from files import WriteError
from images import parse_window
from labels import LABEL_SEP, UNCERTAIN_POLICIES, LabelFormat, is_multi_label, subgroup_values
from models import build_model, check_input_size, forward_views, model_from_checkpoint
from processes import StopRequest, launch_processes, processes_to_launch

HERE = Path(__file__).resolve().parent

# ============================================================================================= arguments


def get_args_parser():
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    # One flag a line (two for a long help text), as in a table: the formatter would spread each over six.
    # fmt: off
    data = parser.add_argument_group("data").add_argument
    data("--data",
         help="folder of class folders, or with train/, val/ (or valid/, validation/) and optional test/ in it")
    data("--csv", help="CSV with a header row: image path, label (default: the sample, data/labels.csv)")
    data("--root", help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    data("--image-col", help="column of image paths (default: 'image', or the first of two)")
    data("--label-col", help="column of labels (default: 'label', or the second of two)")
    data("--label-sep", help="multi-label: the separator of several labels in a value (default: ';', found by itself)")
    data("--label-cols", help="multi-label: 0/1 columns, one per class, as 'A,B,C', or 'all' (all but image/group)")
    data("--uncertain", choices=UNCERTAIN_POLICIES, help="what -1 in --label-cols means (default: an error)")
    data("--val-csv", help="separate validation CSV; replaces --val-split")
    data("--val-root", help="folder the --val-csv paths are relative to (default: --root)")
    data("--test-csv", help="test CSV: best.pt is evaluated on it once, after training")
    data("--test-root", help="folder the --test-csv paths are relative to (default: --root)")
    data("--group-col", help="CSV column of patient/subject ids: a group's images are never in two parts")
    data("--window", help="DICOM/16-bit grey window: CENTER,WIDTH or lung, mediastinum, bone, brain, abdomen")
    data("--group-pattern", help="the same from file names: a regex whose first group is the id, e.g. '^(P\\d+)_'")
    data("--subgroup-col", help="CSV columns (or dicom:KEYWORD) to report per value in subgroups.csv, e.g. sex,site")
    data("--val-split", type=FRACTION, default=0.3, help="fraction held out for validation")
    data("--folds", type=FOLDS, help="K-fold cross-validation: K runs in OUTPUT/fold1..K, each image validated once")
    data("--fold", type=POSITIVE_INT, help="with --folds, run only this fold (e.g. one cluster job per fold)")
    data("--split", choices=["auto", "stratified", "random"], default="auto",
         help="stratified keeps each class's share in train and val; auto = stratified when every class has 2+ images")
    data("--image-size", type=IMAGE_SIZE, default=224, help="training crop size; validation resizes to size*256/224")
    data("--workers", type=COUNT, help="DataLoader worker processes (default: fitted to the cores)")
    data("--cache", choices=["auto", "on", "off"], default="auto",
         help="decode images once into RAM; auto = when they take under a quarter of it")
    data("--skip-bad-images", action="store_true", help="drop images that fail to decode instead of stopping")
    data("--no-duplicate-check", action="store_true", help="skip the search for copies of an image across parts")
    data("--dedupe", action="store_true", help="drop val/test images that copy an image of an earlier part")
    data("--balanced-sampler", action="store_true", help="draw training images with equal weight per class")

    model = parser.add_argument_group("model").add_argument
    model("--model", default="resnet34", help="any torchvision classification model name")
    model("--weights",
          help="pretrained weights: a torchvision name (DEFAULT, IMAGENET1K_V1) or a local .pth state dict")
    model("--freeze-backbone", action="store_true", help="train only the new classification head")
    model("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across torchrun processes")

    optim = parser.add_argument_group("optimization").add_argument
    optim("--epochs", type=POSITIVE_INT, default=3, help="number of epochs")
    optim("--batch-size", type=POSITIVE_INT, default=16, help="images per step (per process under torchrun)")
    optim("--accum-steps", type=POSITIVE_INT, default=1,
          help="sum the gradients of this many batches before each optimizer step (a bigger batch in less memory)")
    optim("--optimizer", choices=["adam", "adamw", "sgd"], default="adam", help="optimizer")
    optim("--lr", type=POSITIVE, default=1e-4, help="learning rate")
    optim("--momentum", type=NON_NEGATIVE, default=0.9, help="SGD momentum")
    optim("--weight-decay", type=NON_NEGATIVE, default=0.0, help="weight decay, not applied to biases and norm layers")
    optim("--lr-schedule", choices=["none", "cosine", "step"], default="none",
          help="learning-rate schedule over the epochs (step: x0.1 every third of the run)")
    optim("--warmup-epochs", type=COUNT, default=0, help="epochs of linear learning-rate warmup")
    optim("--label-smoothing", type=SMOOTHING, default=0.0, help="label smoothing for the cross-entropy loss")
    optim("--class-weights", choices=["none", "balanced"], default="none",
          help="balanced = weight the loss by inverse class frequency")
    optim("--best-metric", choices=["acc", "macro_f1", "auc", "map", "loss"],
          help="what best.pt is best at (auc: macro one-vs-rest ROC AUC) (default: acc; multi-label: map)")
    optim("--threshold", type=FRACTION, help="multi-label: one probability threshold for every class "
          "(default: per class, the best F1 on the validation images)")
    optim("--patience", type=COUNT, default=0, help="stop after this many epochs without a new best (0 = never)")

    deploy = parser.add_argument_group("operating point and calibration, chosen on validation, frozen").add_argument
    deploy("--operating-point", type=operating_point_rule, help="per class threshold: youden, f1, sens=0.95 or "
           "spec=0.90 (default: youden; multi-label: f1)")
    deploy("--positive-class", help="binary: the class the operating point decides (default: the second class)")
    deploy("--calibrate", action=argparse.BooleanOptionalAction, default=True,
           help="fit a temperature on the validation logits (single-label), applied wherever the model is used")
    deploy("--tta", nargs="?", const="crops", choices=presets.TTA_MODES,
           help="--evaluate: average the five crops and their flips (alone), or the image and its flip (flip)")

    extra = parser.add_argument_group("recipe (defaults: the tutorial's)").add_argument
    extra("--recipe", choices=["default", "modern"], default="default",
          help="modern = AdamW 1e-3, weight decay .05, cosine, 1 warmup epoch, label smoothing .1, crop scale .25; "
          "flags given win")
    extra("--augment", choices=presets.AUGMENTS, default="basic", help="basic = crop + flip; or an automatic policy")
    extra("--crop-scale", type=FRACTION, help="smallest RandomResizedCrop area share (default: 0.08; modern: "
          f"{recipe.MODERN_CROP_SCALE}; multi-label: {recipe.MULTI_LABEL_CROP_SCALE}, so findings stay in the crop)")
    extra("--random-erasing", type=PROBABILITY, default=0.0, help="probability of erasing a random box of an image")
    extra("--mixup", type=NON_NEGATIVE, default=0.0, help="MixUp alpha: blend pairs of images and targets (0 = off)")
    extra("--cutmix", type=NON_NEGATIVE, default=0.0, help="CutMix alpha: paste a box of one image into another")
    extra("--ema", type=SMOOTHING, nargs="?", const=recipe.DEFAULT_EMA_DECAY, metavar="DECAY",
          help=f"evaluate and save a moving average of the weights (alone: decay {recipe.DEFAULT_EMA_DECAY}; 0: off)")
    extra("--progressive", type=IMAGE_SIZE, metavar="MIN_SIZE",
          help="train at MIN_SIZE first, growing to --image-size over 3/4 of the epochs (validation: full size)")
    extra("--lr-find", action="store_true", help="run the LR range test, write lr_find.png, print a --lr, and exit")

    run = parser.add_argument_group("run").add_argument
    run("--device", default="auto", help="auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps")
    run("--nproc", type=POSITIVE_INT,
        help="processes to train with (DDP, one per GPU) (default: every visible GPU, else 1)")
    run("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
        help="mixed precision; auto = bf16 where the device supports it, fp16 on older GPUs")
    run("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    run("--seed", type=int, default=0, help="seed for the split, initialisation and augmentation")
    run("--output-dir", help="run directory (default: a new runs/expN)")
    run("--resume", nargs="?", const="last",
        help="continue a run from a checkpoint (alone: the run directory's last.pt)")
    run("--tensorboard", action="store_true", help="also write scalars and pictures to OUTPUT/tensorboard/ "
        "(pip install tensorboard)")
    run("--mlflow", action="store_true", help="also log them to MLflow (pip install mlflow; MLFLOW_TRACKING_URI)")
    run("--evaluate", metavar="CHECKPOINT",
        help="only evaluate a checkpoint on the validation data and write the report")
    # fmt: on
    return parser


def operating_point_rule(text):
    try:
        return decision.parse_rule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_args(args):
    """Fill in the data flags that depend on each other (values are checked by their argparse types)."""
    if args.data and (args.csv or args.test_csv or (args.val_csv and not args.evaluate)):
        raise UsageError("--data takes class folders; drop --csv/--val-csv/--test-csv, or drop --data")
    if args.fold and not (args.folds and args.fold <= args.folds):
        raise UsageError(f"--fold {args.fold} needs --folds K with K >= {args.fold}")
    if args.folds and args.resume not in (None, "last"):
        raise UsageError("--folds resumes with --resume alone: each fold continues from its own last.pt")
    if args.dedupe and args.no_duplicate_check:
        raise UsageError("--dedupe needs the duplicate check; drop --no-duplicate-check")
    if args.data and (args.label_sep or args.label_cols):
        raise UsageError("folders have one class per image; multi-label (--label-sep, --label-cols) needs a --csv")
    if args.progressive and args.progressive >= args.image_size:
        raise UsageError(f"--progressive {args.progressive} must be below --image-size {args.image_size}")
    if args.tta and not args.evaluate:
        raise UsageError("--tta is for --evaluate (and predict.py): training and its report see each image once")
    if args.lr_find and (args.resume or args.folds):
        raise UsageError("--lr-find tries learning rates on a fresh model; drop --resume/--folds")
    if args.label_sep and args.label_cols:
        raise UsageError("--label-sep splits one label column, --label-cols reads 0/1 columns; give one of them")
    if args.uncertain and not args.label_cols:
        raise UsageError("--uncertain says what -1 means in --label-cols columns; add --label-cols")
    if args.data and args.group_col and not args.group_col.startswith("dicom:"):
        raise UsageError("--group-col names a CSV column (or dicom:KEYWORD); for --data use dicom: or --group-pattern")
    try:
        parse_window(args.window)
    except ValueError as e:
        raise UsageError(f"--window {e}") from None
    if args.data is None and args.csv is None and args.root is not None:
        if not Path(args.root).is_dir() or not any(p.is_dir() for p in Path(args.root).iterdir()):
            raise UsageError(f"--root {args.root} without --csv: give --csv, or --data for a folder of class folders")
        print(f"--root {args.root} without --csv: reading it as --data (class folders)", file=sys.stderr)
        args.data, args.root = args.root, None
    if args.data is None and args.csv is None:  # the bundled sample, so that `python train.py` works out of the box
        args.csv, args.root = str(HERE / "data" / "labels.csv"), str(HERE / "data" / "images")
    if args.csv and args.root is None:
        args.root = str(Path(args.csv).parent)


# ================================================================================================== data


def load_samples(args):
    """(train, val, test, class_names, split_method, copies): every image checked before training; validation is
    --val-split of them without a val CSV or folder (splits.labelled_image_sets); copies across parts found."""
    sources = ("data", "csv", "root", "val_csv", "val_root", "test_csv", "test_root", "image_col", "label_col")
    sources = {name: getattr(args, name) for name in (*sources, "group_col", "group_pattern")}
    train_set, val_set, test_set, class_names, split_method = splits.labelled_image_sets(
        **sources, val_split=args.val_split, seed=args.seed, method=args.split, skip_bad=args.skip_bad_images,
        folds=args.folds, fold=args.fold, label_format=label_format_of(args),
    )  # fmt: skip
    val_set, test_set, copies = duplicates.checked(
        train_set, val_set, test_set, args.no_duplicate_check, args.dedupe, args.window
    )
    return train_set, val_set, test_set, class_names, split_method, copies


def subgroups_of(args, parts, class_names):
    """--subgroup-col's values for each part's images ({part: {column: values}}), read before training so that a
    wrong column stops the run at once; the --positive-class checked against the classes too."""
    if args.positive_class is not None and (len(class_names) != 2 or args.positive_class not in class_names):
        raise UsageError(f"--positive-class {args.positive_class}: not a class of this binary task "
                         f"(classes: {', '.join(class_names[:10])})")  # fmt: skip
    if not args.subgroup_col:
        return {}
    return {name: subgroup_values(part, args.subgroup_col) for name, part in parts.items() if part is not None}


def label_format_of(args):
    return LabelFormat(args.label_sep, args.label_cols, args.uncertain)


def build_datasets(args, train_set, val_set, test_set, class_names, resize_size):
    """MyDatasets for each part (test None without a test set), cached in RAM per --cache. Images are
    decoded at the size their transform needs (see images.reduce_on_load), cached or not: training at 2x the
    crop (RandomResizedCrop's larger crops keep full detail), validation exactly at its Resize."""
    train_transform = presets.train_transform(args.image_size, args.augment, args.crop_scale, args.random_erasing)
    eval_transform = presets.eval_transform(args.image_size, resize_size)
    train_side = presets.train_decode_size(args.image_size)
    multi = train_set.multi_label
    train_data = MyDataset(train_set.samples, train_set.root, class_names, train_transform, train_side,
                           multi, window=args.window)  # fmt: skip
    val_data = MyDataset(
        val_set.samples, val_set.root, class_names, eval_transform, resize_size, multi, window=args.window
    )
    test_data = (
        MyDataset(test_set.samples, test_set.root, class_names, eval_transform, resize_size, multi, window=args.window)
        if test_set
        else None
    )
    if args.cache == "on" or (args.cache == "auto" and dataset.cache_fits([train_data, val_data])):
        train_data.fill_cache()
        val_data.fill_cache()
    return train_data, val_data, test_data


def build_dataloaders(args, train_data, val_data, ctx, workers):
    """The training loader (shuffled, sharded under DDP) and the validation loader (each image once)."""
    generator = torch.Generator()  # seeded at the start of every epoch by seed_epoch
    train_sampler = None
    if args.balanced_sampler and train_data.multi_label:
        raise UsageError("--balanced-sampler draws by class, and multi-label images have several; use --class-weights")
    if ctx.world_size > 1:
        if args.balanced_sampler:
            raise UsageError("--balanced-sampler does not work under torchrun yet; use --class-weights balanced")
        train_sampler = DistributedSampler(train_data, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    elif args.balanced_sampler:
        class_counts = np.bincount(train_data.targets, minlength=len(train_data.class_names))
        sample_weights = 1.0 / class_counts[train_data.targets]
        train_sampler = WeightedRandomSampler(sample_weights, len(train_data), generator=generator)
    train_loader = DataLoader(
        train_data,
        args.batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        generator=generator,
        # The last, smaller batch trains, unless it is a single image: that breaks BatchNorm in training.
        drop_last=len(train_sampler or train_data) % args.batch_size == 1,
        **loader_options(workers, ctx.device, persistent=not args.progressive),
    )
    return train_loader, evaluation_loader(val_data, args.batch_size, ctx, workers)


def dataset_of(loader):
    """The MyDataset an evaluation loader reads, whole or (under DDP) as this process's Subset of it."""
    return loader.dataset.dataset if isinstance(loader.dataset, Subset) else loader.dataset


def evaluation_loader(data, batch_size, ctx, workers):
    # Every image is evaluated exactly once, on exactly one rank (no padding duplicates).
    shard = Subset(data, range(ctx.rank, len(data), ctx.world_size)) if ctx.world_size > 1 else data
    return DataLoader(shard, 2 * batch_size, **loader_options(workers, ctx.device))


# ================================================================================================= model


def wrap_model(model, args, ctx):
    """The module the training steps call: DDP under torchrun, compiled with --compile."""
    if ctx.world_size > 1:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(model) if args.compile else model


# ============================================================================================= optimizer


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
    """Per optimizer step learning-rate factor: linear warmup, then constant, cosine or step decay."""
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
    """Cross-entropy; for multi-label (train_targets (N, C) multi-hot) MultiLabelLoss. --class-weights
    balanced: inverse class frequency, multi-label each class's negatives/positives as pos_weight."""
    if isinstance(train_targets, np.ndarray) and train_targets.ndim == 2:
        pos_weight = None
        if args.class_weights == "balanced":
            positives, known = np.nansum(train_targets, 0), (~np.isnan(train_targets)).sum(0)
            pos_weight = torch.tensor(
                (known - positives) / np.maximum(positives, 1), dtype=torch.float32, device=device
            )
        return recipe.MultiLabelLoss(pos_weight, args.label_smoothing)
    weight = None
    if args.class_weights == "balanced":
        counts = np.maximum(np.bincount(train_targets, minlength=num_classes), 1)
        weight = torch.tensor(len(train_targets) / (num_classes * counts), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


# ======================================================================================= epoch, evaluate


def seed_epoch(seed, epoch, ctx, train_loader):
    """Derive every random number of an epoch (shuffle, augmentation, dropout) from (seed, epoch, rank), so a
    resumed run continues exactly as the uninterrupted one would, with no generator state to save."""
    epoch_seed = int(np.random.SeedSequence([seed, epoch, ctx.rank]).generate_state(1)[0])
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    train_loader.generator.manual_seed(epoch_seed)
    if isinstance(train_loader.sampler, DistributedSampler):
        train_loader.sampler.set_epoch(epoch)


def train_one_epoch(
    model, loss_fn, optimizer, scheduler, scaler, train_loader, ctx, args, epoch, bad_images, stop, ema=None, mixer=None
):
    """One pass over the training data, one optimizer step per --accum-steps batches, each followed by the
    --ema update; --mixup/--cutmix mix each batch (`mixer`). Loss and accuracy add up on the device and are
    read only when the progress bar refreshes: the loop never waits for the GPU."""
    model.train()
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device)  # float: a mixed target counts its share
    seen, start, last_refresh = 0, time.perf_counter(), time.perf_counter()
    bar = tqdm(train_loader, f"epoch {epoch}/{args.epochs}", leave=False, disable=not ctx.show_bars, dynamic_ncols=True)
    batches, group_has_gradients = len(train_loader), False
    for step, (images, labels, bad) in enumerate(bar):
        bad_images.handle(bad)
        if images is None and ctx.world_size > 1:  # DDP needs every process in every step
            first = images.where(bad[0].line, bad[0].image)
            raise BadImageError(f"every image of a batch failed to decode, the first: {first}")
        # Gradients of a group of batches add up; each loss is divided by the group's size so that the sum
        # is the mean over the group, as one big batch. The last group of the epoch may be smaller.
        group_start = step - step % args.accum_steps
        group_size = min(args.accum_steps, batches - group_start)
        steps_now = step - group_start + 1 == group_size
        if images is not None:
            images, labels = to_device(images, ctx), labels.to(ctx.device, non_blocking=True)
            if mixer is not None:
                images, labels = mixer(images, labels)
            # Under DDP only the group's last backward all-reduces the gradients.
            no_sync = model.no_sync() if ctx.world_size > 1 and not steps_now else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
                    logits = model(images)
                    loss = loss_fn(logits, labels)
                scaler.scale(loss / group_size).backward()
            group_has_gradients = True
            loss_sum += loss.detach() * len(labels)
            correct += count_correct(logits, labels, isinstance(loss_fn, recipe.MultiLabelLoss))
            seen += len(labels)
        if steps_now and group_has_gradients:  # a group whose every image failed to decode has nothing to step
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:  # the wrapped model's parameters and buffers are the model's own
                ema.update_parameters(model)
            group_has_gradients = False
        if ctx.is_main and time.perf_counter() - last_refresh > (1 if ctx.show_bars else 60) and seen:
            last_refresh = time.perf_counter()  # without a terminal: a plain line a minute instead of a bar
            loss_now, rate = f"{loss_sum.item() / seen:.3f}", f"{seen / (last_refresh - start):.1f}"
            if ctx.show_bars:
                bar.set_postfix(loss=loss_now, img_s=rate)
            else:
                print(f"epoch {epoch}/{args.epochs} step {step + 1}/{batches}: loss {loss_now}, {rate} img/s")
        if stop.agreed(step, ctx):
            break
    bar.close()
    optimizer.zero_grad(set_to_none=True)  # a stop inside a group leaves partial gradients
    totals = torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=ctx.device)])
    if ctx.world_size > 1:
        dist.all_reduce(totals)
    loss_total, correct_total, count = totals.tolist()
    if not math.isfinite(loss_total):
        message = f"training loss became {loss_total} in epoch {epoch}; lower --lr (last.pt keeps the previous epoch)"
        raise UsageError(message)
    return {"train_loss": loss_total / max(count, 1), "train_acc": correct_total / max(count, 1), "count": count}


def find_lr(model, loss_fn, train_loader, ctx, args, output_dir):
    """--lr-find: the LR range test (recipe.lr_range_test) on a copy of the model with its own optimizer;
    writes output_dir/lr_find.png, prints the suggested --lr, and leaves no checkpoint behind."""
    if ctx.world_size > 1:
        raise UsageError("--lr-find runs in one process; drop --nproc or torchrun")
    model = copy.deepcopy(model).train()
    optimizer = build_optimizer(model, args)

    def train_step(images, labels):
        if images is None:  # every image of the batch failed to decode
            return float("nan")
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
            loss = loss_fn(model(to_device(images, ctx)), labels.to(ctx.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def set_lr(lr):
        for group in optimizer.param_groups:
            group["lr"] = lr

    seed_epoch(args.seed, 1, ctx, train_loader)
    lrs, losses, smoothed = recipe.lr_range_test(train_step, set_lr, train_loader)
    suggestion = recipe.suggest_lr(lrs, smoothed)
    if suggestion is None:  # not even the first, smallest step gave a finite loss
        raise UsageError("--lr-find: the loss was not finite from the first step on; check the images and --amp")
    run_files.make_output_dir(output_dir)
    report.save_picture(output_dir, plots.draw_lr_find(lrs, losses, smoothed, suggestion))
    print(f"LR range test, {len(lrs)} steps from {lrs[0]:.0e} to {lrs[-1]:.0e}: {output_dir / 'lr_find.png'}")
    print(f"suggested: --lr {suggestion:.1e} (marked in lr_find.png)")
    return 0


def count_correct(logits, targets, multi_label):
    """Right answers in a batch: the predicted class's share of each target (1 or 0 for a class index; a
    mixed target's weight); multi-label, the images whose known labels are all right at probability 0.5."""
    if multi_label:
        return (((logits > 0) == (targets > 0.5)) | targets.isnan()).all(1).sum()
    if targets.ndim == 2:  # mixed (mixup/cutmix) targets, each row summing to 1
        return targets.gather(1, logits.argmax(1, keepdim=True)).sum()
    return (logits.argmax(1) == targets).sum()


@torch.inference_mode()
def evaluate(model, loader, ctx, bad_images):
    """Every image's log-probabilities (metrics.Predictions), gathered from all processes in dataset order;
    images that fail to decode (with --skip-bad-images) are left out. Multi-label: the logits and multi-hot labels."""
    model.eval()
    if ctx.world_size > 1:  # BatchNorm statistics differ between processes: all evaluate rank 0's, the saved ones
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    shard = loader.dataset  # a Subset of the dataset under DDP (see evaluation_loader)
    data, positions = dataset_of(loader), shard.indices if isinstance(shard, Subset) else range(len(shard))
    indices, labels, batch_logits, seen = [], [], [], 0
    for images, batch_labels, bad in tqdm(loader, desc="validate", leave=False, disable=not ctx.show_bars):
        bad_images.handle(bad)
        batch_positions = positions[seen : seen + len(bad) + (0 if images is None else len(images))]
        seen, skipped = seen + len(batch_positions), {b.image for b in bad}
        if images is None:
            continue
        indices += [i for i in batch_positions if data.images[i] not in skipped]
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
            # stays on the device: no sync per batch
            batch_logits.append(forward_views(model, images, lambda x: to_device(x, ctx), data.multi_label))
        labels.append(batch_labels.reshape(len(batch_labels), -1).float())
    # Once, on the CPU (MPS has no float64): log-softmax in float64, so that a confident model's probabilities
    # do not round to exactly 1 and tie its ranks
    logits = torch.cat(batch_logits).cpu().double() if batch_logits else None
    log_probabilities = logits if data.multi_label or logits is None else logits.log_softmax(1)
    # One float64 row per image, (index, label(s), log-probabilities or logits), exact for any index or label
    classes = len(data.class_names)
    columns = 1 + classes + (classes if data.multi_label else 1)
    rows = torch.cat([torch.tensor(indices)[:, None], torch.cat(labels), log_probabilities],
                     1).double() if labels else torch.zeros(0, columns, dtype=torch.float64)  # fmt: skip
    if ctx.world_size > 1:  # each process pads its rows to the longest shard's count (index -1), then all gather
        padded = torch.full((math.ceil(len(data) / ctx.world_size), columns), -1.0, dtype=torch.float64)
        padded[: len(rows)] = rows
        gathered = [torch.empty_like(padded, device=ctx.device) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, padded.to(ctx.device))
        rows = torch.cat(gathered).cpu()
        rows = rows[rows[:, 0] >= 0]
    rows = rows[rows[:, 0].argsort()]
    if data.multi_label:
        logits = rows[:, 1 + classes :]
        labels = rows[:, 1 : 1 + classes].float()
        return metrics.Predictions(rows[:, 0].long(), labels, nn.functional.logsigmoid(logits), logits)
    return metrics.Predictions(rows[:, 0].long(), rows[:, 1].long(), rows[:, 2:])


# ================================================================================================== main


def evaluate_checkpoint(args, checkpoint, output_dir, device):
    """--evaluate: the report folder of a saved checkpoint, with its own classes, preprocessing, temperature and
    frozen operating point: on every image of --val-csv, or of a --csv or --data the model was not trained on
    (external validation: the honest figure), else on the validation part of the run's own split (optimistic:
    the best epoch and the operating point were chosen there). --tta averages each image's views."""
    ctx = make_context(device, args.amp, checkpoint["mean"], checkpoint["std"])
    class_names, saved = list(checkpoint["class_names"]), checkpoint["args"]
    external = args.val_csv or not run_files.same_file(args.data or args.csv, saved.get("data") or saved.get("csv"))
    if external:
        if args.val_csv:
            source = {"csv": args.val_csv, "root": args.val_root or args.root or Path(args.val_csv).parent}
        else:
            source = {"data": args.data} if args.data else {"csv": args.csv, "root": args.root}
        val_set = splits.evaluation_image_set(
            **source, class_names=class_names, image_col=args.image_col, label_col=args.label_col,
            skip_bad=args.skip_bad_images, label_format=label_format_of(args),
        )  # fmt: skip
        splits.warn_training_images(val_set, Path(args.evaluate).parent, saved.get("root") or saved.get("data"))
    else:
        val_set = load_samples(args)[1]
    if val_set.multi_label != checkpoint.get("multi_label", False):
        kind = "multi-label" if checkpoint.get("multi_label") else "single-label"
        raise UsageError(f"--evaluate {args.evaluate}: a {kind} model; {val_set.source} is not {kind} data")
    subgroups = subgroups_of(args, {"val": val_set}, class_names).get("val")
    size, resize_size = checkpoint["image_size"], checkpoint["resize_size"]
    transform = presets.eval_transform(size, resize_size)
    transform = presets.tta_transform(size, resize_size, args.tta) if args.tta else transform
    window = args.window if args.window is not None else saved.get("window")  # the run's own
    val_data = MyDataset(
        val_set.samples, val_set.root, class_names, transform, resize_size, val_set.multi_label, window=window
    )
    model = model_from_checkpoint(checkpoint, f"--evaluate {args.evaluate}", ctx)
    loader = evaluation_loader(val_data, args.batch_size, ctx, loader_workers(args.workers, device))
    predictions = evaluate(model, loader, ctx, BadImageLog(args.skip_bad_images))
    thresholds = [args.threshold] * len(class_names) if args.threshold is not None else checkpoint.get("thresholds")
    run_files.make_output_dir(output_dir)
    title = f"evaluation of {args.evaluate} on {val_set.source}" + f" with --tta {args.tta}" * bool(args.tta)
    report.write_report(output_dir, predictions, val_data, title, thresholds=thresholds,
                        temperature=checkpoint.get("temperature"), point=checkpoint.get("operating_point"),
                        point_chosen_here=not external, subgroups=subgroups)  # fmt: skip
    report.write_page(output_dir)
    print(f"report folder: {output_dir} (report.html)")
    return 0


def settle_run(args, argv):
    """The device, the run folder and the run's settings, fixed from here on: a resumed or evaluated run's saved
    settings applied, the --recipe preset filled in, the flags checked once. (checkpoint or None, output_dir,
    device, rank, world_size)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    device = choose_device(args.device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    typed = run_files.typed_flags(get_args_parser(), argv or [])
    checkpoint, output_dir = run_files.open_run(args, typed, HERE, world_size)
    if checkpoint is None and not args.evaluate:  # a resumed run has its recipe's values already
        settings = recipe.apply_recipe(args, typed)
        if settings and rank == 0:
            print(settings)
    check_args(args)
    settle_defaults(args, device, checkpoint)
    return checkpoint, output_dir, device, rank, world_size


def settle_defaults(args, device, checkpoint):
    """The defaults that follow from the data and the machine, filled in before anything reads them: what
    best.pt is best at and the crop scale (multi-label: mAP and a larger crop), an evaluated multi-label model's
    CSV read as label sets, and fp32 for --progressive on a CPU."""
    if args.evaluate:
        if checkpoint.get("multi_label") and not args.label_cols:  # label sets, even where none holds a ';'
            args.label_sep = args.label_sep or LABEL_SEP
        return
    multi_label = is_multi_label(args.csv, args.image_col, args.label_col, label_format_of(args))
    if args.best_metric == "map" and not multi_label:
        raise UsageError("--best-metric map is for multi-label data; use acc, macro_f1, auc or loss")
    if args.threshold is not None and not multi_label:
        raise UsageError("--threshold is for multi-label data (one class per image takes the most probable)")
    args.best_metric = args.best_metric or ("map" if multi_label else "acc")
    args.operating_point = args.operating_point or ("f1" if multi_label else "youden")
    args.crop_scale = args.crop_scale or recipe.default_crop_scale(args.recipe, multi_label)
    if args.progressive and args.amp == "auto" and device.type == "cpu":
        # bf16 autocast on a CPU turned the validation loss NaN now and then after a size change (oneDNN
        # channels_last kernels, about 1 run in 6 at 16 -> 48 px): fp32 there, unless --amp asks for bf16.
        args.amp = "off"
        if int(os.environ.get("RANK", "0")) == 0:
            print("--progressive on a CPU: training in fp32 (--amp bf16 to insist)")


def prepare_run_folder(output_dir, args, ctx, parts, split_method, copies, train_loader, workers, resuming):
    """Rank 0 writes split.csv and args.json, prints the setup, reports copies across parts, and draws a first
    augmented batch (the loader is reseeded at every epoch, so this draws nothing from training's numbers)."""
    if not ctx.is_main:
        return
    run_files.make_output_dir(output_dir)
    run_files.write_split(output_dir, {name: part and part.samples for name, part in parts.items()})
    run_files.write_args(output_dir, args, ctx, workers, split_method)
    report.print_setup(args, ctx, parts, split_method, train_loader, output_dir)
    duplicates.report(output_dir, copies, args.dedupe)
    if resuming:
        print(f"resuming after epoch {resuming}")
        return
    images, targets, _ = next(iter(train_loader))
    if images is not None:
        report.save_picture(output_dir, plots.draw_batch(images, targets, train_loader.dataset.class_names))


def stopped(stop, bad_image, saver, ctx, args, output_dir, world_size):
    """The end of a run a signal or a bad image interrupted: the one-line error, or the resume command and
    128 + the signal's number. last.pt was saved before."""
    if bad_image is not None:
        saved = "last.pt saved" if ctx.is_main else "last.pt holds the previous epoch"
        raise DataError(f"{bad_image}; fix or remove it, or pass --skip-bad-images ({saved})") from bad_image
    torchrun = f"torchrun --nproc_per_node={world_size} train.py" if world_size > 1 else "python train.py"
    launcher = f"python train.py --nproc {args.nproc}" if args.nproc else torchrun
    if ctx.is_main:
        command = f"{launcher} --output-dir {output_dir} --resume"
        print(f"saved {output_dir / 'last.pt'}; continue with: {command}", file=sys.stderr)
    return 128 + stop.signum


def report_best(model, saver, loaders, ctx, bad_images, output_dir, args, best_predictions=None, subgroups=None):
    """best.pt's report on the validation images and, once, on the test images (`loaders` "val" and "test" or
    None), computed in fp32 whatever the training precision, so they are what predict.py and the ONNX export
    give for the same images (the best epoch's `best_predictions` are reused when they were fp32 already).
    On the validation predictions the model's temperature (--calibrate) and then its operating point are chosen
    and frozen into best.pt; the test report applies them unchanged. Validation figures are optimistic (the
    best epoch and the operating point were chosen on them); the test split is the honest figure."""
    saver.wait()
    if ctx.world_size > 1:
        dist.barrier()  # rank 0 has finished writing best.pt
    model.load_state_dict(run_files.load_checkpoint(saver.best_path, "best.pt")["model"])
    exact = dataclasses.replace(ctx, amp_dtype=None)
    reusable = best_predictions is not None and ctx.amp_dtype is None
    val_predictions = best_predictions if reusable else evaluate(model, loaders["val"], exact, bad_images)
    test_loader = loaders["test"]
    test_predictions = evaluate(model, test_loader, exact, bad_images) if test_loader is not None else None
    if not ctx.is_main:
        return
    best = saver.best
    print(f"best {args.best_metric} {abs(best['score']):.3f} at epoch {best['epoch']}: {saver.best_path}")
    val_data, thresholds = dataset_of(loaders["val"]), best.get("thresholds")  # multi-label: the best epoch's
    temperature, point = None, None
    if not val_data.multi_label:
        temperature = decision.fit_temperature(val_predictions) if args.calibrate else None
        names = val_data.class_names
        positive = names.index(args.positive_class or names[1]) if len(names) == 2 else None
        calibrated = decision.with_temperature(val_predictions, temperature)
        point = decision.choose_operating_point(calibrated, args.operating_point, positive)
        saver.freeze_decision(temperature, point)
    decided = {"thresholds": thresholds, "temperature": temperature, "point": point}
    report.write_report(output_dir, val_predictions, val_data, f"validation report of {saver.best_path}",
                        **decided, point_chosen_here=True, subgroups=subgroups.get("val"))  # fmt: skip
    print("(validation figures are optimistic: the best epoch and the operating point were chosen on these images; "
          "the test set is the honest figure)")  # fmt: skip
    if not val_data.multi_label:
        picture = cam.draw_val_cam(model, args.model, lambda x: to_device(x, exact), val_predictions, val_data)
        report.save_picture(output_dir, picture)
    if test_predictions is not None:
        title = f"test report of {saver.best_path} (operating point and temperature frozen on validation)"
        report.write_report(output_dir, test_predictions, dataset_of(test_loader), title, "test_", **decided,
                            subgroups=subgroups.get("test"))  # fmt: skip
    report.write_methods(output_dir)
    report.write_page(output_dir)  # last: it lists every file of the folder


def main(args, argv=None):
    # ---- settle the run: device, folder, settings (args do not change after this)
    checkpoint, output_dir, device, rank, world_size = settle_run(args, argv)
    if args.evaluate:
        return evaluate_checkpoint(args, checkpoint, output_dir, device)
    weights_name = models.torchvision_weights_name(args.weights)
    mean, std, resize_size = presets.weights_preprocessing(args.model, weights_name, args.image_size)
    ctx = make_context(device, args.amp, mean, std, rank, world_size)

    # ---- data
    train_set, val_set, test_set, class_names, split_method, copies = load_samples(args)
    subgroups = subgroups_of(args, {"val": val_set, "test": test_set}, class_names)
    digest = run_files.split_digest(train_set.samples, val_set.samples)
    if checkpoint is not None and checkpoint.get("split_digest") != digest:
        raise UsageError(f"--resume: {args.data or args.csv} no longer gives this run's split; start a new run")
    run = run_files.RunInfo(
        run_files.plain_args(args), class_names, mean, std, resize_size, digest, train_set.multi_label
    )
    train_data, val_data, test_data = build_datasets(args, train_set, val_set, test_set, class_names, resize_size)
    workers = loader_workers(args.workers, device, world_size)
    train_loader, val_loader = build_dataloaders(args, train_data, val_data, ctx, workers)

    # ---- model, optimizer
    torch.manual_seed(args.seed)  # the model's initial weights; each epoch is seeded by seed_epoch
    torch.backends.cudnn.benchmark = device.type == "cuda"  # input sizes are fixed: pick the fastest kernels once
    model = build_model(args.model, len(class_names), None if checkpoint else args.weights, args.freeze_backbone)
    check_input_size(model, args.model, args.progressive or args.image_size)
    model.to(device, memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, math.ceil(len(train_loader) / args.accum_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=ctx.amp_dtype == torch.float16)
    loss_fn = build_loss(args, train_data.targets, len(class_names), device)
    if args.lr_find:
        return find_lr(model, loss_fn, train_loader, ctx, args, output_dir)
    mixer = recipe.BatchMixer(args.mixup, args.cutmix, len(class_names)) if args.mixup or args.cutmix else None
    ema = recipe.make_ema(model, args.ema) if args.ema else None  # evaluated and saved as best.pt instead
    if checkpoint is not None:
        run_files.restore_training_state(checkpoint, model, optimizer, scheduler, scaler, ema)
    train_model = wrap_model(model, args, ctx)
    scored_model = ema.module if ema is not None else model
    last = (model, optimizer, scheduler, scaler, ema)  # what last.pt holds
    saver = run_files.CheckpointSaver(output_dir, run, args.best_metric, ctx.is_main, checkpoint)
    history = list(checkpoint["history"]) if checkpoint else []
    parts = {"train": train_set, "val": val_set, "test": test_set}
    trackers = tracking.Trackers(args, output_dir, ctx.is_main)  # --tensorboard, --mlflow: a missing one stops here
    prepare_run_folder(output_dir, args, ctx, parts, split_method, copies, train_loader, workers, len(history))

    # ---- the train/validate loop: best.pt and last.pt after every epoch; a signal or a bad image stops it cleanly
    bad_images, bad_image, thresholds, best_predictions = BadImageLog(args.skip_bad_images), None, None, None
    first_epoch = len(history) + 1
    with StopRequest() as stop:
        try:
            for epoch in range(first_epoch, args.epochs + 1):
                if stop.signum is not None:  # asked to stop during validation or a save
                    break
                seed_epoch(args.seed, epoch, ctx, train_loader)
                if args.progressive:  # validation stays at the full size
                    size = recipe.progressive_size(epoch, args.epochs, args.progressive, args.image_size)
                    presets.set_crop_size(train_data.transform, size)
                started, bad_images.count = time.perf_counter(), 0
                train_stats = train_one_epoch(
                    train_model, loss_fn, optimizer, scheduler, scaler, train_loader, ctx, args, epoch, bad_images,
                    stop, ema, mixer,
                )  # fmt: skip
                if stop.signum is not None:
                    break
                predictions = evaluate(scored_model, val_loader, ctx, bad_images)
                if predictions.multi_label:  # each label's threshold, by --operating-point on these images
                    thresholds = decision.choose_label_thresholds(predictions, args.operating_point, args.threshold)
                val_scores = metrics.epoch_scores(predictions, thresholds)  # val_loss, val_acc, val_macro_f1, val_auc
                history.append({
                    "epoch": epoch, "train_loss": train_stats["train_loss"], "train_acc": train_stats["train_acc"],
                    **val_scores, "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
                })  # fmt: skip
                improved = saver.epoch_done(epoch, val_scores, scored_model, history, last, thresholds)
                best_predictions = predictions if improved else best_predictions  # best.pt's, for the report
                if ctx.is_main:
                    report.epoch_done(output_dir, history)  # metrics.csv, results.png, report.html
                    trackers.epoch(history[-1])
                    if epoch == first_epoch:  # from the first epoch's line on, the folder holds a checkpoint;
                        saver.wait()  # later ones are written while the next epoch trains
                    report.print_epoch(history[-1], args.epochs, improved, bad_images.count)
                if args.patience and epoch - saver.best["epoch"] >= args.patience:
                    if ctx.is_main:
                        print(f"no better {args.best_metric} for {args.patience} epochs: stopping early")
                    break
        except BadImageError as e:
            bad_image = e
        if stop.signum is not None or bad_image is not None:
            # The weights reached so far, as of the last completed epoch (one history row each): --resume
            # restarts the interrupted one. Saved while the handlers still catch a second signal.
            saver.save_last(len(history), history, last, thresholds)
            saver.wait()
    if stop.signum is not None or bad_image is not None:
        return stopped(stop, bad_image, saver, ctx, args, output_dir, world_size)

    # ---- the final report: best.pt on the validation images, and once on the test images
    if saver.best["epoch"]:
        test_loader = evaluation_loader(test_data, args.batch_size, ctx, workers) if test_data is not None else None
        loaders = {"val": val_loader, "test": test_loader}
        report_best(model, saver, loaders, ctx, bad_images, output_dir, args, best_predictions, subgroups)
        trackers.finish(args)
    saver.wait()  # the run ends with every checkpoint on disk
    return 0


def cross_validate(args, argv):
    """--folds K: one complete run per fold in OUTPUT/fold1 ... foldK (or only --fold N), then the summary."""
    if args.output_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--folds under torchrun needs --output-dir, the same folder for every process")
    output_dir = run_files.choose_output_dir(args.output_dir, args.resume, HERE)
    for fold in [args.fold] if args.fold else range(1, args.folds + 1):
        fold_args = argparse.Namespace(**{**vars(args), "fold": fold, "output_dir": str(output_dir / f"fold{fold}")})
        status = main(fold_args, argv)
        if status:
            return status
    if not args.fold and os.environ.get("RANK", "0") == "0":
        report.write_cv_summary(output_dir, args.folds)
        report.write_page(output_dir)
    return 0


def run_cli(argv=None):
    """Parse the command line and run; user mistakes become one `error:` line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = None
    sys.stdout.reconfigure(line_buffering=True)  # a log file (nohup, a cluster job) gets each line as it is said
    try:
        args = get_args_parser().parse_args(argv)
        nproc = processes_to_launch(args)
        if nproc > 1:
            check_args(argparse.Namespace(**vars(args)))  # a flag mistake shows once, not once per process
            if args.nproc is None:
                global_batch = args.batch_size * args.accum_steps * nproc
                print(f"{nproc} GPUs: training on all of them (--device cuda:0 for one), global batch {global_batch}")
            if args.folds and args.output_dir is None:  # every process continues in the same folder
                argv = [*argv, "--output-dir", str(run_files.choose_output_dir(None, args.resume, HERE))]
            return launch_processes(nproc, argv)
        return cross_validate(args, argv) if args.folds else main(args, argv)
    except (UsageError, DataError, WriteError) as e:
        # A setup mistake is the same in every torchrun process: rank 0 says it; a bad image is in one's shard.
        if os.environ.get("RANK", "0") == "0" or isinstance(e.__cause__, BadImageError):
            print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            # Exit at once, before the other processes notice that this one is gone: the launcher then sees this
            # status first, not theirs (a clean shutdown races with them being stopped). Saved checkpoints first.
            with contextlib.suppress(Exception):
                run_files.wait_for_checkpoints()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:  # before training started or after it ended: nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        message = f"out of device memory at --batch-size {args.batch_size}; lower --batch-size or --image-size"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except RuntimeError:
        if not dist.is_initialized():
            raise
        # Under torchrun, a process that stopped (bad input, a signal) breaks the others' collectives.
        message = f"process {dist.get_rank()} stopped because another one failed; see its error above"
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_cli())
