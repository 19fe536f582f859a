"""The CSV-backed dataset: which images there are, what their labels are, and how to open them.

This module knows about files and labels, not about training. Everything a user can get wrong in a CSV or
an image folder is caught here and reported as a `DataError` whose message names the file, the line or
the column and says what to do.
"""

import collections
import csv
import io
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
from tqdm import tqdm

# Transparent pixels are composited onto this colour (white, like a page or a viewer's background).
BACKGROUND_RGB = (255, 255, 255)
# Labels that are really a missing value left behind by a spreadsheet or by pandas.
MISSING_LABELS = {"", "nan", "na", "n/a", "null"}
# Column names that usually mean "these images come from one person or object": a --group-col hint.
GROUP_LIKE_COLUMNS = {
    "patient", "patient_id", "patientid", "subject", "subject_id", "case", "case_id", "study", "study_id",
    "participant", "participant_id", "person", "person_id", "individual", "animal", "specimen", "nodule",
}  # fmt: skip


class DataError(Exception):
    """Bad input data. The message is meant for the user, as one line."""


# Multi-label: the separator of the label sets train.py and its files write ("a;b"), and what a 0/1 column may hold.
LABEL_SEP = ";"
UNCERTAIN_POLICIES = ("zero", "one", "ignore")


class LabelFormat(NamedTuple):
    """How a CSV gives each image's labels. Single-label: one label column. Multi-label: a label column whose
    values are sets joined by `sep` (";" found by itself, an empty value is "no label"), or `columns` ("A,B,C"
    or "all") of 0/1, one per class, where `uncertain` says what -1 means (CheXpert's "uncertain")."""

    sep: str | None = None
    columns: str | None = None
    uncertain: str | None = None

    @property
    def stated(self):
        """Whether the flags themselves ask for multi-label."""
        return self.sep is not None or self.columns is not None


DEFAULT_LABELS = LabelFormat()  # the default: one label column, multi-label only when its values hold ";"


def read_labels(csv_path, image_col=None, label_col=None, group_col=None, group_optional=False, label_sep=None):
    """Read a CSV of image paths and labels into a DataFrame with columns image, label and line, and group
    with `group_col` (the column of patient or subject ids; with `group_optional`, only where the CSV has it).

    `line` is the line number in the file (the header is line 1), so errors and reports can point at it.
    Without explicit column names, `image` and `label` are used, or the only two columns in order.
    Labels are kept as text so that `1`, `2`, `10` stay what they are. With `label_sep`, each label is a set of
    labels joined by it (multi-label), kept as the sorted set joined by LABEL_SEP; empty is the empty set.
    """
    header, rows = read_csv_rows(csv_path)
    image_col, label_col = _pick_columns(csv_path, header, image_col, label_col)
    image_at, label_at = header.index(image_col), header.index(label_col)
    group_at = _group_column(csv_path, header, group_col, group_optional)
    records = []
    for line, fields in rows:
        image, label = fields[image_at].strip(), fields[label_at].strip()
        if not image:
            raise DataError(f"{csv_path} line {line}: empty '{image_col}'; give every row an image path")
        if label_sep is not None:
            label = _label_set(csv_path, line, label.split(label_sep))
        elif label.lower() in MISSING_LABELS:
            raise DataError(
                f"{csv_path} line {line}: missing label ({label!r}) for {image}; fill it in or drop the row "
                "(multi-label data, where empty is no label: pass --label-sep ';')"
            )
        records.append(
            (image.replace("\\", "/"), label, line) + _group_of(csv_path, line, fields, group_at, image, group_col)
        )
    samples = pd.DataFrame(records, columns=["image", "label", "line"] + (["group"] if group_at is not None else []))
    return _drop_duplicates(csv_path, samples)


def read_label_columns(csv_path, columns, uncertain=None, image_col=None, group_col=None, group_optional=False):
    """(samples, classes) from a CSV with one 0/1 column per class (--label-cols "A,B,C", or "all": every
    column but the image and group columns): samples as read_labels gives them for multi-label, with an
    `ignored` column (the classes whose value is unknown, for --uncertain ignore). A value must be 1, 0 or
    empty (0); -1 is uncertain: an error unless `uncertain` is zero, one or ignore."""
    header, rows = read_csv_rows(csv_path)
    found = ", ".join(repr(name) for name in header)
    image_col = image_col or ("image" if "image" in header else header[0])
    if image_col not in header:
        raise DataError(f"{csv_path}: no column {image_col!r} (columns found: {found}); name it with --image-col")
    if columns == "all":
        classes = [name for name in header if name not in (image_col, group_col)]
    else:
        classes = [name.strip() for name in columns.split(",") if name.strip()]
    for name in classes:
        if name not in header:
            raise DataError(f"{csv_path}: no column {name!r} (columns found: {found}); check --label-cols")
    if not classes:
        raise DataError(f"{csv_path}: --label-cols {columns} names no label column (columns found: {found})")
    group_at = _group_column(csv_path, header, group_col, group_optional)
    at = [header.index(name) for name in classes]
    records = []
    for line, fields in rows:
        image = fields[header.index(image_col)].strip()
        if not image:
            raise DataError(f"{csv_path} line {line}: empty '{image_col}'; give every row an image path")
        positive, ignored = [], []
        for name, column in zip(classes, at):
            value = _label_value(csv_path, line, name, fields[column].strip(), uncertain)
            if value == 1:
                positive.append(name)
            elif value is None:
                ignored.append(name)
        label, ignored = _label_set(csv_path, line, positive), LABEL_SEP.join(ignored)
        records.append(
            (image.replace("\\", "/"), label, line, ignored)
            + _group_of(csv_path, line, fields, group_at, image, group_col)
        )
    names = ["image", "label", "line", "ignored"] + (["group"] if group_at is not None else [])
    return _drop_duplicates(csv_path, pd.DataFrame(records, columns=names)), classes


def _label_value(csv_path, line, column, text, uncertain):
    """1 or 0 for a 0/1 column's value, None for an uncertain one that --uncertain ignore leaves out."""
    try:
        value = float(text) if text else 0.0  # pandas writes 1.0 and 0.0; CheXpert leaves blanks
    except ValueError:
        value = float("nan")
    if value == -1:
        if uncertain is None:
            raise DataError(
                f"{csv_path} line {line}: column {column!r} is {text} (uncertain); "
                "choose what it means with --uncertain zero, one or ignore"
            )
        return {"zero": 0, "one": 1, "ignore": None}[uncertain]
    if value not in (0, 1):
        raise DataError(f"{csv_path} line {line}: column {column!r} is {text!r}; a label column holds 1, 0 or empty")
    return int(value)


def _label_set(csv_path, line, labels):
    """A label set as one string: its distinct non-empty labels sorted and joined by LABEL_SEP."""
    labels = sorted({label.strip() for label in labels} - {""})
    bad = next((label for label in labels if LABEL_SEP in label), None)
    if bad is not None:
        raise DataError(f"{csv_path} line {line}: label {bad!r} contains {LABEL_SEP!r}; rename it")
    return LABEL_SEP.join(labels)


def label_set(text):
    """The labels of a multi-label sample's `label` (or `ignored`) value: 'a;b' -> ['a', 'b'], '' -> []."""
    return text.split(LABEL_SEP) if text else []


def label_matrix(samples, class_names=None):
    """(N, C) float32 multi-hot targets of multi-label samples: 1 for each label, 0 for the others, NaN where
    the value is unknown (--uncertain ignore). Classes: `class_names`, else the labels found, sorted."""
    sets = [label_set(text) for text in samples["label"]]
    if class_names is None:
        class_names = sorted({name for labels in sets for name in labels})
    index_of = {name: i for i, name in enumerate(class_names)}
    targets = np.zeros((len(sets), len(class_names)), dtype=np.float32)
    for row, labels in enumerate(sets):
        targets[row, [index_of[name] for name in labels]] = 1
    if "ignored" in samples:
        for row, text in enumerate(samples["ignored"]):
            targets[row, [index_of[name] for name in label_set(text)]] = np.nan
    return targets


def _group_column(csv_path, header, group_col, group_optional):
    if group_col is not None and group_col not in header and not group_optional:
        found = ", ".join(repr(name) for name in header)
        raise DataError(f"{csv_path}: no column {group_col!r} (columns found: {found}); check --group-col")
    return header.index(group_col) if group_col in header else None


def _group_of(csv_path, line, fields, group_at, image, group_col):
    """(group,) of a CSV row, or () without a group column."""
    if group_at is None:
        return ()
    group = fields[group_at].strip()
    if group.lower() in MISSING_LABELS:
        raise DataError(f"{csv_path} line {line}: empty {group_col!r} for {image}; give every image its group")
    return (group,)


def group_like_column(csv_path):
    """A column of the CSV whose name suggests it groups images (a patient id), else None: for a hint."""
    header, _ = read_csv_rows(csv_path)
    return next((name for name in header if name.strip().lower().replace(" ", "_") in GROUP_LIKE_COLUMNS), None)


def groups_from_pattern(samples, pattern, source):
    """Each image's group: the first group of the regular expression `pattern` searched in its file name."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise DataError(f"--group-pattern {pattern!r}: not a regular expression ({e})") from None
    if regex.groups < 1:
        raise DataError(f"--group-pattern {pattern!r}: put the group in parentheses, e.g. '^(P\\d+)_'")
    groups = []
    for image in samples["image"]:
        match = regex.search(Path(image).name)
        if not match or not match.group(1):
            raise DataError(f"{source}: --group-pattern {pattern!r} finds no group in {image}; fix the pattern")
        groups.append(match.group(1))
    return samples.assign(group=groups)


def read_images(csv_path, image_col="image", label_col="label"):
    """Read the images of a CSV to predict: a DataFrame with columns image, line and label, the text of
    `label_col` as it is (a class, a label set, empty), to score the predictions against; None without it."""
    header, rows = read_csv_rows(csv_path)
    if image_col not in header:
        found = ", ".join(repr(name) for name in header)
        raise DataError(f"{csv_path}: no column {image_col!r} (columns found: {found}); name it with --image-col")
    at = header.index(image_col)
    label_at = header.index(label_col) if label_col in header and label_col != image_col else None
    records = [
        (fields[at].strip().replace("\\", "/"), line, None if label_at is None else fields[label_at].strip())
        for line, fields in rows
        if fields[at].strip()
    ]
    return pd.DataFrame(records, columns=["image", "line", "label"])


def read_csv_rows(csv_path):
    """The header and the (line number, fields) of each non-blank row of a UTF-8 CSV with a header row.

    Refuses what would otherwise be read wrongly without a word: other encodings, NUL bytes, and rows with
    more or fewer fields than the header (pandas shifts such a row silently).
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise DataError(f"{csv_path}: no such file; give a CSV of image paths and labels")
    if csv_path.is_dir():
        raise DataError(f"{csv_path} is a directory; give a CSV file of image paths and labels")
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # the BOM Excel writes is accepted
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{csv_path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save it as 'CSV UTF-8'"
        ) from None
    if "\0" in text:
        line = _line_at(text, text.index("\0"))
        raise DataError(f"{csv_path} line {line}: NUL byte; a CSV is plain text, save it as 'CSV UTF-8'")
    # Only \n, \r and \r\n end lines, as the csv module counts them: str.splitlines would also break on
    # form feeds, U+0085 and U+2028 inside a name and report rows on lines that no editor shows.
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or all(not name.strip() for name in header):
        raise DataError(f"{csv_path} is empty; it needs a header row and one row per image")
    header = [name.strip() for name in header]
    rows = []
    for fields in reader:
        if not any(field.strip() for field in fields):
            continue  # blank lines, often at the end of a file
        if len(fields) != len(header):
            raise DataError(
                f"{csv_path} line {reader.line_num}: {len(fields)} fields but the header has {len(header)}; "
                "quote values that contain commas"
            )
        rows.append((reader.line_num, fields))
    if not rows:
        raise DataError(f"{csv_path} has a header but no rows; add one row per image")
    return header, rows


def _line_at(text, index):
    """The line number of `text[index]`, counting line ends the way csv.reader does."""
    return len(re.findall(r"\r\n|\r|\n", text[:index])) + 1


def _pick_columns(csv_path, header, image_col, label_col):
    found = ", ".join(repr(name) for name in header)
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{csv_path}: duplicate column {duplicated[0]!r} (columns found: {found})")
    if image_col is None and label_col is None:
        if {"image", "label"} <= set(header):
            return "image", "label"
        if len(header) == 2:
            return header[0], header[1]
    image_col, label_col = image_col or "image", label_col or "label"
    for flag, name in (("--image-col", image_col), ("--label-col", label_col)):
        if name not in header:
            raise DataError(f"{csv_path}: no column {name!r} (columns found: {found}); name it with {flag}")
    if image_col == label_col:
        raise DataError(f"{csv_path}: --image-col and --label-col are both {image_col!r}")
    return image_col, label_col


def _drop_duplicates(csv_path, samples):
    repeated = samples[samples.duplicated("image", keep=False)]
    for image, rows in repeated.groupby("image", sort=False):
        if rows["label"].nunique() > 1:
            lines = ", ".join(str(n) for n in rows["line"])
            hint = "keep one label per image"
            if _looks_like_images(samples["label"]) and not _looks_like_images(samples["image"]):
                hint = "the columns look swapped (labels first?); name them with --image-col and --label-col"
            raise DataError(f"{csv_path}: {image} has conflicting labels on lines {lines}; {hint}")
    if len(repeated):
        unique = samples.drop_duplicates("image").reset_index(drop=True)
        print(
            f"warning: {csv_path}: {len(samples) - len(unique)} repeated rows (same image, same label) were dropped",
            file=sys.stderr,
        )
        return unique
    return samples


def _looks_like_images(values):
    """Most values end in an image file extension."""
    return sum(has_file_allowed_extension(str(v), IMG_EXTENSIONS) for v in values) > len(values) / 2


def sorted_class_names(labels):
    """The distinct labels in order: numerically when they are all integers, else alphabetically."""
    names = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def where(line, image):
    """How messages point at an image: its CSV line when it came from a CSV, else its path."""
    return f"line {line} {image}" if line else str(image)


def _visible(name):
    # Hidden entries are never classes or images: .DS_Store, .ipynb_checkpoints/, macOS '._x.jpg' files.
    return not name.startswith(".") and name != "__MACOSX"


def _class_folder_images(folder):
    """The images under folder/<class>/ (recursively), as a DataFrame of image (relative to folder), label,
    line (0: not from a CSV). Stray files beside the class folders are ignored; an empty class folder is warned
    about and is not a class."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and _visible(entry.name))
    # torchvision's own walker and image extensions; hidden parts below a class folder are skipped too.
    found = make_dataset(
        str(folder),
        {name: i for i, name in enumerate(classes)},
        is_valid_file=lambda path: (
            has_file_allowed_extension(path, IMG_EXTENSIONS)
            and all(_visible(part) for part in Path(path).relative_to(folder).parts)
        ),
        allow_empty=True,
    )
    records = [(Path(path).relative_to(folder).as_posix(), classes[target], 0) for path, target in found]
    samples = pd.DataFrame(records, columns=["image", "label", "line"])
    for name in sorted(set(classes) - set(samples["label"])):
        print(
            f"warning: {Path(folder) / name} has no images ({', '.join(IMG_EXTENSIONS)}); it is not a class",
            file=sys.stderr,
        )
    return samples


def image_folders(data_dir):
    """Read a folder of class folders: (all, val, test) DataFrames with image paths relative to `data_dir`.

    Either data_dir/train/<class>/ with a validation folder (val/, valid/ or validation/) and optionally test/,
    each with the same class folders (val and test are None when absent), or data_dir/<class>/ (val and test
    None: the caller splits). Folder names are the labels, sorted; images are torchvision's extensions.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such folder; give a folder of class folders")
    parts = {}
    if (data_dir / "train").is_dir():
        val_name = next((n for n in ("val", "valid", "validation") if (data_dir / n).is_dir()), None)
        for name in ("train", val_name, "test"):
            if name and (data_dir / name).is_dir():
                samples = _class_folder_images(data_dir / name)
                samples["image"] = name + "/" + samples["image"]
                parts[name] = samples
        parts["val"] = parts.pop(val_name, None) if val_name else None
    else:
        parts["train"] = _class_folder_images(data_dir)
    train = parts["train"]
    if train.empty:
        raise DataError(
            f"--data {data_dir}: no images in class folders; expected {data_dir}/<class>/<image> "
            f"or {data_dir}/train/<class>/<image> ({', '.join(IMG_EXTENSIONS)})"
        )
    for name in ("val", "test"):
        samples = parts.get(name)
        if samples is not None:
            missing = sorted(set(samples["label"]) - set(train["label"]))
            if missing:
                raise DataError(
                    f"--data {data_dir}: class {missing[0]!r} is in {name} but not in train; "
                    "add its images to train or remove it"
                )
            if samples.empty:
                parts[name] = None
    return train, parts.get("val"), parts.get("test")


class ImageSet(NamedTuple):
    """Labelled images: `samples` (columns image, label, line, and size once checked), the folder their paths
    are relative to, and what messages call them (the CSV, or the --data folder). Multi-label: each label is
    a set (see read_labels), and `classes` the CSV's label columns when it has them."""

    samples: pd.DataFrame
    root: Path
    source: str
    multi_label: bool = False
    classes: tuple = ()


def read_image_sets(
    data=None,
    csv=None,
    root=None,
    val_csv=None,
    val_root=None,
    test_csv=None,
    test_root=None,
    image_col=None,
    label_col=None,
    group_col=None,
    group_pattern=None,
    label_format=DEFAULT_LABELS,
):
    """The labelled images that --data or the CSV flags name: (all, val, test) ImageSets, where val and test
    are None when not given (the caller splits `all`). val and test paths are relative to `root` by default.
    With `group_col` (CSV) or `group_pattern` (on file names), the samples have a group column. The first
    CSV decides whether the labels are multi-label (see LabelFormat); the others are read the same way."""
    if data:
        image_sets = [ImageSet(s, Path(data), str(data)) if s is not None else None for s in image_folders(data)]
    else:
        parts = ((csv, root, False), (val_csv, val_root or root, True), (test_csv, test_root or root, True))
        sep = label_format.sep
        if sep is None and not label_format.columns and csv and label_col_holds(csv, image_col, label_col, LABEL_SEP):
            sep = LABEL_SEP
        image_sets = [
            _read_image_set(path, Path(folder), image_col, label_col, group_col, optional, label_format, sep)
            if path
            else None
            for path, folder, optional in parts
        ]
    if group_pattern:
        image_sets = [
            s and s._replace(samples=groups_from_pattern(s.samples, group_pattern, s.source)) for s in image_sets
        ]
    return tuple(image_sets)


def _read_image_set(path, folder, image_col, label_col, group_col, group_optional, label_format, sep):
    if label_format.columns:
        columns, uncertain = label_format.columns, label_format.uncertain
        samples, classes = read_label_columns(path, columns, uncertain, image_col, group_col, group_optional)
        return ImageSet(samples, folder, str(path), True, tuple(classes))
    samples = read_labels(path, image_col, label_col, group_col, group_optional, sep)
    return ImageSet(samples, folder, str(path), sep is not None)


def label_col_holds(csv_path, image_col, label_col, sep):
    """Whether some value of the CSV's label column contains `sep`: multi-label, found by itself."""
    header, rows = read_csv_rows(csv_path)
    at = header.index(_pick_columns(csv_path, header, image_col, label_col)[1])
    return any(sep in fields[at] for _, fields in rows)


def labelled_image_sets(
    *sources, val_split, seed, method="auto", skip_bad=False, folds=None, fold=None, label_format=DEFAULT_LABELS
):
    """(train, val, test, class_names, split_method): the ImageSets read_image_sets(*sources) reads, every image
    checked (see `checked`), the classes those of the training images. Without a validation CSV or folder,
    validation is `val_split` of the images (see split_samples), whole groups at a time when there are groups.
    Refuses a single class, val/test labels that are not classes, and a --val-csv whose images are all --csv
    images; warns when a group is in two parts, or when the CSV has a column that looks like a grouping."""
    everything, val_set, test_set = read_image_sets(*sources, label_format=label_format)
    column = group_like_column(sources[1]) if sources[1] and "group" not in everything.samples else None
    if column:  # sources[1] is --csv
        print(
            f"hint: {sources[1]} has a column {column!r}; if it names the patient or subject of each image, pass "
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
        train_set, method = everything, "val folder" if sources[0] else "separate CSV"  # sources[0] is --data
    warn_shared_groups({"train": train_set, "val": val_set, "test": test_set})
    if "group" in train_set.samples:
        groups = pd.concat([part.samples["group"] for part in (train_set, val_set, test_set) if part is not None])
        method = f"grouped by {sources[9] or 'pattern'}: {groups.nunique()} groups, {method}"  # sources[9]: group_col
    return train_set, val_set, test_set, class_names, method


def classes_of(image_set):
    """The classes of the (training) images: their labels sorted, or a multi-label CSV's label columns."""
    if image_set.multi_label:
        class_names = list(image_set.classes) or sorted_class_names(
            {name for text in image_set.samples["label"] for name in label_set(text)}
        )
        if not class_names:
            raise DataError(f"{image_set.source}: no image has a label; a multi-label classifier needs at least 1")
        return class_names
    class_names = sorted_class_names(image_set.samples["label"])
    if len(class_names) < 2:
        raise DataError(f"{image_set.source}: only one class ({class_names[0]!r}); a classifier needs at least 2")
    return class_names


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
    csv, root, class_names, image_col=None, label_col=None, skip_bad=False, label_format=DEFAULT_LABELS
):
    """A CSV's labelled images to evaluate a trained model on: its labels among `class_names`, every image checked."""
    image_set = read_image_sets(
        csv=csv, root=root, image_col=image_col, label_col=label_col, label_format=label_format
    )[0]
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


def check_labels(image_set, class_names):
    """Refuse labels that are not among the (training) classes."""
    if image_set.multi_label and image_set.classes and set(image_set.classes) != set(class_names):
        raise DataError(f"{image_set.source}: its label columns are not the training CSV's ({', '.join(class_names)})")
    labels = image_set.samples["label"]
    found = {name for text in labels for name in label_set(text)} if image_set.multi_label else set(labels)
    unknown = sorted(found - set(class_names))
    if unknown:
        raise DataError(f"{image_set.source}: labels not among the training classes: {', '.join(unknown[:5])}")


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
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_image(path, short_side=None):
    """Open an image file as 8-bit RGB, whatever its mode, upright according to its EXIF orientation.

    With `short_side`, the image is reduced (never enlarged) so that its shorter side is at most `short_side`
    pixels, decoding only what that needs; see `reduce_on_load`.
    """
    with Image.open(path) as im:
        if short_side is not None:
            return reduce_on_load(im, short_side)
        im = ImageOps.exif_transpose(im)  # also loads the first frame of an animation or multi-page file
        return to_rgb(im)


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
    size = _resized_size(im.size, short_side)
    if size != im.size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    if transpose is not None:
        im = im.transpose(transpose)
    return to_rgb(im)


def reduced_size(im, short_side):
    """The (width, height) that reduce_on_load(im, short_side) will return, before the EXIF orientation,
    from the header of the just-opened image `im` alone (it drafts `im`; decode nothing)."""
    im.draft("RGB", (short_side, short_side))
    width, height = im.size
    factor = _reduce_factor(im.size, short_side)
    if factor > 1:
        width, height = -(-width // factor), -(-height // factor)  # Image.reduce rounds up
    return _resized_size((width, height), short_side)


def _reduce_factor(size, short_side):
    return min(size) // (2 * short_side)


def _resized_size(size, short_side):
    """torchvision's Resize(short_side) size for `size` (width, height), or `size` itself when not larger."""
    width, height = size
    if min(width, height) <= short_side:
        return size
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


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


def to_rgb(im):
    """Convert any Pillow image to RGB without losing what is in it.

    16- and 32-bit greyscale is rescaled from the 16-bit range (a plain convert clips it to 255);
    transparent pixels are composited onto BACKGROUND_RGB instead of showing whatever colour they hide.
    """
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
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
    """

    def __init__(self, samples, root, class_names, transform=None, short_side=None, multi_label=False):
        self.root = Path(root) if root is not None else None  # None: image paths are used as they are
        self.images = list(samples["image"])
        self.lines = list(samples["line"])
        self.sizes = list(samples["size"]) if "size" in samples else None  # (width, height) once checked
        self.class_names = list(class_names)
        self.multi_label = multi_label
        index_of = {name: i for i, name in enumerate(class_names)}
        if multi_label:  # (N, C) float32 multi-hot rows, NaN where unknown (see label_matrix)
            self.targets = label_matrix(samples, self.class_names)
        else:  # -1 for an unlabelled image (prediction)
            self.targets = [-1 if label is None else index_of[label] for label in samples["label"]]
        self.transform = transform
        self.short_side = short_side
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
            with Image.open(self._path(index)) as im:
                width, height = im.size if self.short_side is None else reduced_size(im, self.short_side)
                return width * height
        except Exception:
            return 0

    def _path(self, index):
        image = self.images[index]
        return resolve_image_path(self.root, image) if self.root is not None else Path(image)

    def _load(self, index):
        return load_image(self._path(index), self.short_side)

    def _cached(self, index):
        pixels, offsets, shapes = self.cache
        height, width, _ = shapes[index]
        if height == 0:  # not cached (it failed when the cache was filled): fail again now, and be reported
            return self._load(index)
        start = offsets[index]
        array = pixels[start : start + height * width * 3].numpy().reshape(height, width, 3)
        return Image.fromarray(array)


class BadImageError(Exception):
    """An image failed to decode during training and --skip-bad-images is off."""


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


def physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown (Windows): never cache automatically


def collate_skipping_bad(batch):
    """Collate the good samples of a batch; return (images, labels, bad) where bad lists the BadImages.

    When every sample failed, images and labels are None.
    """
    good = [sample for sample in batch if not isinstance(sample[0], BadImage)]
    bad = [sample[0] for sample in batch if isinstance(sample[0], BadImage)]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad
