"""Which images train, validate and test: the image sets read, checked and compared (a class only in val, a
validation CSV that repeats the training one, a patient in two parts), then the seeded split, stratified,
whole groups (patients) at a time, or one fold of K.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from errors import DataError
from images import check_images, resolve_image_path
from labels import (
    DEFAULT_LABELS,
    check_labels,
    classes_of,
    group_like_column,
    label_matrix,
    read_image_sets,
)


def labelled_image_sets(
    *, val_split, seed, method="auto", skip_bad=False, folds=None, fold=None, label_format=DEFAULT_LABELS, **sources
):
    """(train, val, test, class_names, split_method): the ImageSets read_image_sets(**sources) reads (data, csv,
    root, val_csv, val_root, test_csv, test_root, image_col, label_col, group_col, group_pattern), every image
    checked (see `checked`), the classes those of the training images. Without a validation CSV or folder,
    validation is `val_split` of the images (see split_samples), whole groups at a time when there are groups.
    Refuses a single class, val/test labels that are not classes, and a --val-csv whose images are all --csv
    images; warns when a group is in two parts, or when the CSV has a column that looks like a grouping."""
    everything, val_set, test_set = read_image_sets(**sources, label_format=label_format)
    csv = sources.get("csv")
    column = group_like_column(csv) if csv and "group" not in everything.samples else None
    if column:
        print(
            f"hint: {csv} has a column {column!r}; if it names the patient or subject of each image, pass "
            f"--group-col {column} so that none is in both train and validation",
            file=sys.stderr,
        )
    class_names = classes_of(everything)
    for part in (val_set, test_set):
        if part is not None:
            check_labels(part, class_names)
    parts = (everything, val_set, test_set)
    everything, val_set, test_set = (checked(part, skip_bad) if part is not None else None for part in parts)
    if val_set is None:
        train_set, val_set, method = split_samples(everything, val_split, seed, method, folds, fold)
    elif folds:
        raise DataError(f"--folds splits {everything.source} itself; drop the separate validation images")
    else:
        check_val_images_are_not_training_images(everything, val_set)  # after the check: it refuses outside paths
        train_set, method = everything, "val folder" if sources.get("data") else "separate CSV"
    warn_shared_groups({"train": train_set, "val": val_set, "test": test_set})
    if "group" in train_set.samples:
        groups = pd.concat([part.samples["group"] for part in (train_set, val_set, test_set) if part is not None])
        method = f"grouped by {sources.get('group_col') or 'pattern'}: {groups.nunique()} groups, {method}"
    return train_set, val_set, test_set, class_names, method


def warn_shared_groups(parts):
    """One warning per pair of parts (name -> ImageSet or None) that share a group: its images leak."""
    named = [
        (name, set(part.samples["group"]))
        for name, part in parts.items()
        if part is not None and "group" in part.samples
    ]
    for i, (name_a, groups_a) in enumerate(named):
        for name_b, groups_b in named[i + 1 :]:
            shared = sorted(groups_a & groups_b)
            if shared:
                print(
                    f"warning: {name_a} and {name_b} share {len(shared)} of their groups (first: {shared[0]}); "
                    f"{name_b} then measures images of patients the model has seen",
                    file=sys.stderr,
                )


def evaluation_image_set(
    *, class_names, csv=None, root=None, data=None, image_col=None, label_col=None, skip_bad=False,
    label_format=DEFAULT_LABELS,
):  # fmt: skip
    """The labelled images to evaluate a trained model on, every one of a CSV or of a folder of class folders:
    their labels among `class_names`, every image checked. A folder with train/val/test parts is refused: which
    part is meant must be said."""
    image_set, val_set, test_set = read_image_sets(
        data=data, csv=csv, root=root, image_col=image_col, label_col=label_col, label_format=label_format
    )
    if val_set is not None or test_set is not None:
        raise DataError(f"--data {data}: has train/val/test parts; name the one to evaluate, e.g. --data {data}/test")
    check_labels(image_set, class_names)
    return checked(image_set, skip_bad)


def split_samples(image_set, val_split, seed, method, folds=None, fold=None):
    """(train, val, method): `val_split` of an ImageSet's images held out for validation, the same ones for the
    same seed and images. Stratified keeps each class's share in both parts; random is the original script's
    random_split; auto is stratified when every class has 2 images or more. With `folds`, validation is fold
    `fold` (1-based) of `folds` equal parts instead, whole groups at a time when there are groups.
    """
    samples = image_set.samples
    generator = torch.Generator().manual_seed(seed)
    # Multi-label: the multi-hot rows, stratified per class by assign_groups with every image its own group.
    labels = (
        np.nan_to_num(label_matrix(samples, image_set.classes or None)) if image_set.multi_label else samples["label"]
    )
    counts = pd.Series(labels.sum(0)) if image_set.multi_label else samples["label"].value_counts()
    if method == "auto":
        method = "stratified" if counts.min() >= 2 else "random"
    is_val = np.zeros(len(samples), dtype=bool)
    if folds:  # each image (or group) in one fold: assign_groups with every image its own group when ungrouped
        groups = samples["group"] if "group" in samples else np.arange(len(samples))
        is_val = assign_groups(labels, groups, [1 / folds] * folds, seed, method == "stratified") == fold - 1
        method = f"fold {fold} of {folds}, {method}"
    elif "group" in samples or (image_set.multi_label and method == "stratified"):
        groups = samples["group"] if "group" in samples else np.arange(len(samples))
        is_val = assign_groups(labels, groups, [1 - val_split, val_split], seed, method == "stratified") == 1
    elif method == "random":
        order = torch.randperm(len(samples), generator=generator).numpy()
        train_size = int(len(samples) * (1 - val_split))
        is_val[order[train_size:]] = True
    else:
        for label in sorted(counts.index):
            rows = np.flatnonzero(samples["label"].to_numpy() == label)
            order = rows[torch.randperm(len(rows), generator=generator).numpy()]
            val_size = min(len(rows) - 1, max(1, round(len(rows) * val_split))) if len(rows) > 1 else 0
            is_val[order[:val_size]] = True
    train_count, val_count = int((~is_val).sum()), int(is_val.sum())
    if train_count < 2 or val_count == 0:  # BatchNorm cannot train on a single image
        left = {0: "no training images", 1: "1 training image"}.get(train_count, "no validation images")
        raise DataError(
            f"{image_set.source}: --val-split {val_split} leaves {left} out of {len(samples)}; "
            "add images or change --val-split"
        )
    train, val = samples[~is_val].reset_index(drop=True), samples[is_val].reset_index(drop=True)
    return image_set._replace(samples=train), image_set._replace(samples=val), method


def assign_groups(labels, groups, fractions, seed, stratified=True):
    """The part (0 .. len(fractions) - 1) of each image, whole groups at a time: no group is in two parts.

    Groups go largest first (equal sizes in seeded random order), each to the part where it brings the
    images closest to the parts' shares of every class (`stratified`) or of all images; the result is as
    stratified as the groups allow. The same seed and samples give the same parts."""
    labels = np.asarray(labels) if stratified else np.zeros(len(labels), dtype=int)
    group_names, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if labels.ndim == 2:  # multi-hot rows: the images without any label count as a class of their own
        membership = np.column_stack([labels, labels.sum(1) == 0]).astype(float)
        membership = membership[:, membership.sum(0) > 0]
    else:
        _, class_of = np.unique(labels, return_inverse=True)
        membership = np.eye(class_of.max() + 1)[class_of]
    counts = np.zeros((len(group_names), membership.shape[1]))  # images of each class in each group
    np.add.at(counts, group_of, membership)
    order = np.random.default_rng(seed).permutation(len(group_names))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    class_totals = counts.sum(0)
    target = np.asarray(fractions, dtype=float)[:, None] * class_totals  # (parts, classes)
    filled = np.zeros_like(target)
    part_of_group = np.zeros(len(group_names), dtype=int)
    for group in order:
        # the change in squared shortfall, relative to each class's size, of adding this group to each part
        after, before = filled + counts[group] - target, filled - target
        cost = ((after**2 - before**2) / class_totals**2).sum(1)
        part_of_group[group] = int(np.argmin(cost))
        filled[part_of_group[group]] += counts[group]
    return part_of_group[group_of]


def checked(image_set, skip_bad=False):
    """`image_set` with a size column after checking every image (see check_images); with `skip_bad`, the
    unusable ones are dropped with a count instead of stopping."""
    sizes = check_images(image_set.samples, image_set.root, image_set.source, skip_bad=skip_bad)
    samples = image_set.samples.assign(size=sizes)
    good = samples["size"].notna()
    if not good.all():
        print(f"warning: {image_set.source}: dropped {int((~good).sum())} unusable images", file=sys.stderr)
    return image_set._replace(samples=samples[good].reset_index(drop=True))


def check_val_images_are_not_training_images(train_set, val_set):
    """Validation images that are training images make validation meaningless: some is a warning, all of
    them is the forgotten --val-root."""
    train_files = {resolve_image_path(train_set.root, p) for p in train_set.samples["image"]}
    shared = sum(resolve_image_path(val_set.root, p) in train_files for p in val_set.samples["image"])
    if shared and shared == len(val_set.samples):
        raise DataError(
            f"--val-csv {val_set.source}: all its {shared} images are --csv images under {val_set.root}; "
            "pass --val-root with the folder of the validation images, or drop --val-csv to split --csv"
        )
    if shared:
        print(
            f"warning: {shared} of the {len(val_set.samples)} --val-csv images are also in --csv; "
            "validation accuracy will look better than it is",
            file=sys.stderr,
        )


def warn_training_images(image_set, run_dir, training_root):
    """External data that holds images the model trained on (split.csv of the run in `run_dir`, its paths
    relative to `training_root`) does not give an external figure: one warning with the count."""
    split_csv = Path(run_dir) / "split.csv"
    if not split_csv.is_file() or training_root is None:
        return
    trained = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    trained_files = {(Path(training_root) / p).resolve() for p in trained.loc[trained["split"] == "train", "image"]}
    shared = sum((Path(image_set.root) / p).resolve() in trained_files for p in image_set.samples["image"])
    if shared:
        print(
            f"warning: {shared} of the {len(image_set.samples)} images of {image_set.source} trained this model "
            "(its split.csv): their figures are not external",
            file=sys.stderr,
        )
