"""Which images there are and what their labels are: CSV rows (image, label, group columns), multi-label sets
and 0/1 label columns, class folders, and the ImageSet they become. Everything a user can get wrong in a CSV
or an image folder is caught here as a `DataError` whose message names the file, the line or the column and
says what to do.
"""

import csv
import io
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from torchvision.datasets.folder import make_dataset

from errors import DataError
from images import IMAGE_EXTENSIONS, dicom_values, is_image_file, looks_like_images, resolve_image_path

# Labels that are really a missing value left behind by a spreadsheet or by pandas.
MISSING_LABELS = {"", "nan", "na", "n/a", "null"}
# Column names that usually mean "these images come from one person or object": a --group-col hint.
GROUP_LIKE_COLUMNS = {
    "patient", "patient_id", "patientid", "subject", "subject_id", "case", "case_id", "study", "study_id",
    "participant", "participant_id", "person", "person_id", "individual", "animal", "specimen", "nodule",
}  # fmt: skip


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
            if looks_like_images(samples["label"]) and not looks_like_images(samples["image"]):
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


def sorted_class_names(labels):
    """The distinct labels in order: numerically when they are all integers, else alphabetically."""
    names = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


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
            is_image_file(path) and all(_visible(part) for part in Path(path).relative_to(folder).parts)
        ),
        allow_empty=True,
    )
    records = [(Path(path).relative_to(folder).as_posix(), classes[target], 0) for path, target in found]
    samples = pd.DataFrame(records, columns=["image", "label", "line"])
    for name in sorted(set(classes) - set(samples["label"])):
        print(
            f"warning: {Path(folder) / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); it is not a class",
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
            f"or {data_dir}/train/<class>/<image> ({', '.join(IMAGE_EXTENSIONS)})"
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
    CSV decides whether the labels are multi-label (see LabelFormat); the others are read the same way.
    A `group_col` of "dicom:KEYWORD" reads each image's group from its DICOM header instead (see dicom_groups)."""
    dicom_keyword = group_col.removeprefix(DICOM_GROUP) if group_col and group_col.startswith(DICOM_GROUP) else None
    if dicom_keyword is not None:
        group_col = None
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
    if dicom_keyword is not None:
        image_sets = [s and s._replace(samples=dicom_groups(s, dicom_keyword)) for s in image_sets]
    return tuple(image_sets)


# --group-col dicom:PatientID: the group is that element of each image's DICOM header.
DICOM_GROUP = "dicom:"


def dicom_groups(image_set, keyword):
    """The samples of `image_set` with a group column: each image's DICOM header element `keyword` (any
    keyword, e.g. PatientID), its headers read in threads. An image whose header cannot be read is its own
    group (the image check then reports or skips it); a readable header without the keyword is an error."""
    if not keyword:
        raise DataError("--group-col dicom: needs a DICOM keyword after the colon, e.g. dicom:PatientID")
    paths = []
    for image in image_set.samples["image"]:
        try:
            paths.append(resolve_image_path(image_set.root, image))
        except ValueError:
            paths.append(Path(image_set.root) / image)  # refused by the image check
    try:
        groups = dicom_values(paths, keyword)
    except KeyError as e:
        raise DataError(
            f"{image_set.source}: {e.args[0]} has no DICOM {keyword!r} (--group-col {DICOM_GROUP}{keyword}); "
            "fill it in or group by another keyword"
        ) from None
    groups = [
        group if group is not None else f"unreadable:{image}"
        for group, image in zip(groups, image_set.samples["image"])
    ]
    return image_set.samples.assign(group=groups)


def subgroup_values(image_set, columns):
    """--subgroup-col: for each of `columns` ('sex,site' or dicom:KEYWORD), the value of every image of
    `image_set`, in its samples' order: from the CSV's column (the rows the samples came from), or from the
    DICOM header. A missing column or a folder without a CSV is an error naming the flag; an empty value is
    the subgroup 'missing'."""
    values = {}
    for column in [c.strip() for c in columns.split(",") if c.strip()]:
        if column.startswith(DICOM_GROUP):
            keyword = column.removeprefix(DICOM_GROUP)
            paths = [Path(image_set.root) / image for image in image_set.samples["image"]]
            if not keyword:
                raise DataError("--subgroup-col dicom: needs a DICOM keyword after the colon, e.g. dicom:Manufacturer")
            # images without the element (or an unreadable header) are the subgroup 'missing'
            values[column] = [value or "missing" for value in dicom_values(paths, keyword, required=False)]
            continue
        if not str(image_set.source).lower().endswith(".csv"):
            raise DataError(f"--subgroup-col {column}: {image_set.source} is not a CSV; folders have dicom: only")
        header, rows = read_csv_rows(image_set.source)
        if column not in header:
            found = ", ".join(repr(name) for name in header)
            raise DataError(f"--subgroup-col {column}: no such column in {image_set.source} (columns found: {found})")
        at = header.index(column)
        by_line = {line: fields[at].strip() or "missing" for line, fields in rows}
        values[column] = [by_line[line] for line in image_set.samples["line"]]
    return values


def _read_image_set(path, folder, image_col, label_col, group_col, group_optional, label_format, sep):
    if label_format.columns:
        columns, uncertain = label_format.columns, label_format.uncertain
        samples, classes = read_label_columns(path, columns, uncertain, image_col, group_col, group_optional)
        return ImageSet(samples, folder, str(path), True, tuple(classes))
    samples = read_labels(path, image_col, label_col, group_col, group_optional, sep)
    return ImageSet(samples, folder, str(path), sep is not None)


def is_multi_label(csv_path, image_col, label_col, label_format):
    """Whether the training CSV's labels are label sets: asked for by the flags, or found (a value holds ';').
    Class folders (no CSV) are never multi-label."""
    if csv_path is None:
        return False
    return label_format.stated or label_col_holds(csv_path, image_col, label_col, LABEL_SEP)


def label_col_holds(csv_path, image_col, label_col, sep):
    """Whether some value of the CSV's label column contains `sep`: multi-label, found by itself."""
    header, rows = read_csv_rows(csv_path)
    at = header.index(_pick_columns(csv_path, header, image_col, label_col)[1])
    return any(sep in fields[at] for _, fields in rows)


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


def check_labels(image_set, class_names):
    """Refuse labels that are not among the (training) classes."""
    if image_set.multi_label and image_set.classes and set(image_set.classes) != set(class_names):
        raise DataError(f"{image_set.source}: its label columns are not the training CSV's ({', '.join(class_names)})")
    labels = image_set.samples["label"]
    found = {name for text in labels for name in label_set(text)} if image_set.multi_label else set(labels)
    unknown = sorted(found - set(class_names))
    if unknown:
        raise DataError(f"{image_set.source}: labels not among the training classes: {', '.join(unknown[:5])}")
