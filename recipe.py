"""The training recipe beyond the tutorial's defaults: the --recipe modern preset, the multi-label loss,
stronger augmentation, progressive resizing, MixUp/CutMix, an EMA of the weights, and a learning-rate range
test (its picture, lr_find.png, is drawn by plots.py).

Each piece is a plain function or a small callable that train.py switches on with a flag; with the flags off the
run is exactly the tutorial's. Every random number comes from the generators train.seed_epoch seeds (torch's
global RNG here), so a resumed run replays an epoch exactly.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

DEFAULT_EMA_DECAY = 0.999
# Multi-label's default RandomResizedCrop scale: at the single-label 0.08, about 40% of findings covering 3% of
# the image end up less than half inside the crop while their label stays; at 0.5, 14% (benchmarks/crop_scale.py).
MULTI_LABEL_CROP_SCALE = 0.5
# --recipe modern: chosen by measurement for a few thousand images trained for tens of epochs (README, "A better
# recipe"). Left out: TrivialAugment (it cost accuracy in such short runs: the network is still underfitting),
# EMA (no gain there: its averaging window outlasts the run), MixUp/CutMix and random erasing (regularise more).
MODERN_RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "lr_schedule": "cosine",
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
}
MODERN_CROP_SCALE = 0.25  # the preset's --crop-scale; multi-label keeps its own larger default


def default_crop_scale(recipe_name, multi_label):
    """--crop-scale when not given: torchvision's 0.08, the modern recipe's, or multi-label's (never smaller)."""
    if multi_label:
        return MULTI_LABEL_CROP_SCALE
    return MODERN_CROP_SCALE if recipe_name == "modern" else 0.08


LR_FIND_BETA = 0.98  # fastai's smoothing of the loss in the range test
LR_FIND_DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its best
LR_FIND_MIN_STEPS = 5  # before this, the smoothed loss is too young to call a divergence
LR_FIND_CLEAR_FALL = 0.1  # a fall of the smoothed loss smaller than this share of its start is noise


def apply_recipe(args, typed):
    """--recipe modern: set MODERN_RECIPE's values on `args`, except for the flags typed on the command line
    (`typed`, their names), which win; the crop scale follows in default_crop_scale, once the data says
    whether it is multi-label. Returns the line that says what was set, or None for the default recipe."""
    if args.recipe != "modern":
        return None
    for name, value in MODERN_RECIPE.items():
        if name not in typed:
            setattr(args, name, value)

    def flag(name):
        value = getattr(args, name)
        return (
            f"--{name.replace('_', '-')} {value:g}"
            if isinstance(value, float)
            else f"--{name.replace('_', '-')} {value}"
        )

    line = "recipe modern: " + ", ".join(flag(name) for name in MODERN_RECIPE if name not in typed)
    if "crop_scale" not in typed:
        line += f", --crop-scale {MODERN_CROP_SCALE:g} (multi-label: {MULTI_LABEL_CROP_SCALE:g})"
    given = [flag(name) for name in MODERN_RECIPE if name in typed]
    return line + (f"; given: {', '.join(given)}" if given else "")


# ====================================================================================== multi-label loss


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy per class (BCEWithLogitsLoss), averaged over the known labels: NaN targets
    (--uncertain ignore) count for nothing. Label smoothing pulls each target towards 0.5."""

    def __init__(self, pos_weight=None, label_smoothing=0.0):
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss(reduction="none", pos_weight=pos_weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets):
        known = ~targets.isnan()
        targets = targets.nan_to_num(0) * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return (self.bce(logits.float(), targets) * known).sum() / known.sum().clamp(min=1)


# ========================================================================================== augmentation


def progressive_size(epoch, epochs, min_size, final_size):
    """The training crop size for 1-based `epoch` under FFCV-style progressive resizing.

    Small images early are cheap and the network first learns coarse features; the size grows linearly from
    `min_size` at epoch 1 to `final_size` at the end of the ramp (the first 75% of the epochs, rounded half up),
    then stays there, so the last epochs train (and the run ends) at the size validation uses. Sizes are rounded
    down to a multiple of 16 (fewer distinct shapes for cudnn to tune), within [min_size, final_size].
    """
    ramp = max(1, math.floor(0.75 * epochs + 0.5))
    if epoch >= ramp:
        return final_size
    size = min_size + (final_size - min_size) * (epoch - 1) / (ramp - 1)
    return max(min_size, min(final_size, int(size) // 16 * 16))


# ========================================================================================== MixUp, CutMix


class BatchMixer:
    """MixUp and/or CutMix on a batch already on the device: (images, targets) -> (images, soft targets).

    Each image is mixed with the one before it in the (shuffled) batch. `targets` are class indices (B,) or, for
    multi-label, multi-hot floats (B, num_classes); the result is always float (B, num_classes), each row
    lam * its own targets + (1 - lam) * its partner's (rows of 1 stay 1). With both alphas above 0, each batch
    gets one of the two at random, as torchvision's reference recipe does. lam, the CutMix box and the choice
    come from torch's global RNG, which train.seed_epoch seeds.
    """

    def __init__(self, mixup_alpha, cutmix_alpha, num_classes):
        mixers = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixers:
            raise ValueError("BatchMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, images, targets):
        return self.mix(images, targets)


# ================================================================================================== EMA


def make_ema(model, decay):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm statistics), to evaluate and
    save alongside it: `ema.update_parameters(model)` after each optimizer step, `ema.module` is the averaged
    model, and `ema.state_dict()` resumes it exactly (it holds the update count).

    The first update copies the weights; later ones use min(decay, (1 + n) / (10 + n)) with n the updates so
    far (timm's and TensorFlow's warmup), so that a run from scratch is not dominated by its random initial
    weights: the average follows the model closely at first and reaches `decay` after about 9 / (1 - decay)
    updates. Integer buffers (BatchNorm's num_batches_tracked) are copied: an average of counts means nothing.
    """

    @torch.no_grad()
    def ema_update(ema_tensors, model_tensors, num_averaged):
        # AveragedModel groups the tensors by device and dtype: one call holds only floats or only integers.
        if not ema_tensors[0].is_floating_point():
            torch._foreach_copy_(ema_tensors, model_tensors)
            return
        # The weight stays a tensor on the device: reading it (.item()) would wait for the GPU at every step.
        n = num_averaged.float()
        weight = 1 - torch.clamp((1 + n) / (10 + n), max=decay)
        steps = torch._foreach_sub(model_tensors, ema_tensors)  # ema += (model - ema) * weight, a lerp
        torch._foreach_mul_(steps, weight)
        torch._foreach_add_(ema_tensors, steps)

    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


# ===================================================================================== LR range test


def lr_range_test(train_step, set_lr, batches, start_lr=1e-7, end_lr=10.0, steps=100):
    """The learning-rate range test (Smith 2015, fastai's lr_find): train `steps` steps with the lr growing
    geometrically from `start_lr` to `end_lr`, and record the loss at each.

    train_step(images, labels) takes one optimizer step and returns its loss; set_lr(lr) sets the optimizer's
    learning rate; `batches` is re-iterated when it runs out, and each of its items starts with (images, labels)
    (train.py's loader's (images, labels, bad) works as is). The test stops at a non-finite loss (not recorded)
    or once the smoothed loss exceeds 4x its best. It trains the model: run it on a copy, or restore the
    weights and the optimizer after it.

    Returns (lrs, losses, smoothed): the lrs tried, the raw losses and fastai's smoothed losses, of equal length.
    """
    factor = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    iterator = iter(batches)
    for step in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            batch = next(iterator, None)
            if batch is None:
                raise ValueError("lr_range_test: `batches` yields no batch") from None
        lr = start_lr * factor**step
        set_lr(lr)
        loss = float(train_step(batch[0], batch[1]))
        if not math.isfinite(loss):
            break
        average = LR_FIND_BETA * average + (1 - LR_FIND_BETA) * loss
        smooth = average / (1 - LR_FIND_BETA ** (step + 1))  # bias correction: the average starts at 0
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(smooth)
        best = min(best, smooth)
        if step >= LR_FIND_MIN_STEPS and smooth > LR_FIND_DIVERGED * best:
            break
    return lrs, losses, smoothed


def suggest_lr(lrs, smoothed):
    """The lr where the smoothed loss falls fastest (the most negative slope against log lr) before its minimum,
    as fastai and Lightning suggest. The first tenth of the points is skipped (Lightning skips 10): at the
    smallest lrs the loss barely moves and its noise would give the steepest slope. When the loss never falls
    by LR_FIND_CLEAR_FALL of its start (a flat, noisy curve: its steepest point is noise), or with fewer than
    3 points up to the minimum, the lr at the minimum / 10 (fastai's older rule). None without a finite loss."""
    if not lrs:
        return None
    skip = len(lrs) // 10
    lowest = skip + int(np.argmin(smoothed[skip:]))
    start = max(smoothed[: skip + 1])
    if lowest - skip < 2 or start - smoothed[lowest] < LR_FIND_CLEAR_FALL * start:
        return lrs[lowest] / 10
    slopes = np.gradient(np.asarray(smoothed[skip : lowest + 1]), np.log(lrs[skip : lowest + 1]))
    return lrs[skip + int(np.argmin(slopes))]
