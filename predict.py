"""Predict classes for images with a checkpoint written by train.py.

    python predict.py runs/exp1/best.pt photo.jpg more_photos/            # files and folders (recursive)
    python predict.py runs/exp1/best.pt new.csv --root images --topk 3    # a CSV with an 'image' column

Writes --out (a CSV): image, label, confidence, [top2_label, top2_confidence, ... up to --topk], then one
probability column per class, named by the class (prefixed 'p_' if a class name clashes with a column above).
The same rows without the probability columns are printed to stdout; messages go to stderr. For a CSV that
also has a 'label' column, the accuracy on it is reported. Preprocessing is the checkpoint's validation
transform, so predicting a run's validation images reproduces its validation accuracy (given the same --amp).
"""

import argparse
import csv
import io
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import train
from dataset import (
    BadImage,
    DataError,
    collate_skipping_bad,
    describe,
    load_image,
    read_csv_rows,
    read_images,
    read_labels,
    resolve_image_path,
)
from train import UsageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def get_args_parser():
    parser = train.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="best.pt or last.pt from a train.py run")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or CSV files")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: %(default)s)")
    parser.add_argument("--topk", type=int, default=1, help="also list the K best classes, as topN_label/_confidence")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="mixed precision, as in train.py"
    )
    parser.add_argument("--image-col", default="image", help="column of image paths in CSV inputs")
    parser.add_argument("--root", default=None, help="folder CSV image paths are relative to (default: the CSV's)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: fitted)")
    return parser


def read_image_column(csv_path, image_col):
    """A CSV's images as a DataFrame (image, label, line); label is None when the CSV has no 'label' column."""
    header, _ = read_csv_rows(csv_path)
    if "label" in header and image_col != "label":
        return read_labels(csv_path, image_col, "label")  # labels to score the predictions against
    samples = read_images(csv_path, image_col)
    samples["label"] = None
    return samples


def collect_images(inputs, image_col, root):
    """Everything to predict, in order, as (name shown in the output, root or None, path, true label or None)."""
    items = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            # Hidden files are skipped: macOS '._x.jpg' metadata files are not images despite their name.
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            items += [(str(p), None, p, None) for p in found]
        elif path.suffix.lower() == ".csv" and path.is_file():
            samples = read_image_column(path, image_col)
            csv_root = Path(root) if root else path.parent
            items += [(image, csv_root, image, label) for image, label in zip(samples["image"], samples["label"])]
        elif path.exists():
            items.append((arg, None, path, None))  # named explicitly: tried whatever its extension
        else:
            raise UsageError(f"{arg}: no such file or folder")
    if not items:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UsageError(f"no images found in {', '.join(inputs)} (looked for {extensions} files, or CSV rows)")
    return items


class ImageList(Dataset):
    """The images to predict, through the validation transform; a failure yields a BadImage, not an exception,
    so one unreadable file is skipped wherever the loading runs, DataLoader workers included."""

    def __init__(self, items, transform):
        self.items = items
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        name, root, path, _ = self.items[index]
        try:
            file = resolve_image_path(root, path) if root is not None else path  # CSV paths stay inside --root
            return self.transform(load_image(file)), index
        except Exception as e:  # Pillow raises many types
            return BadImage(name, 0, describe(e)), index


def load_model(path, device, channels_last):
    checkpoint = train.load_checkpoint(path, "checkpoint")  # weights_only=True: never runs pickled code
    needed = ("model", "model_name", "class_names", "image_size", "mean", "std")
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in needed):
        raise UsageError(f"checkpoint {path}: not a checkpoint written by train.py")
    return train.model_from_checkpoint(checkpoint, f"checkpoint {path}", device, channels_last), checkpoint


def main(args):
    for flag, value, least in (("--topk", args.topk, 1), ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must not be negative, got {args.workers}")
    device = train.choose_device(args.device)
    amp = train.choose_amp(args.amp, device)
    channels_last = device.type in ("cpu", "cuda")  # as train.py: faster for convnets there
    items = collect_images(args.images, args.image_col, args.root)  # first: input mistakes show up at once
    model, checkpoint = load_model(args.checkpoint, device, channels_last)
    class_names = list(checkpoint["class_names"])

    # Exactly the validation preprocessing of the run: same resize, crop and normalisation.
    transform = train.build_transforms(
        checkpoint["image_size"], checkpoint["mean"], checkpoint["std"], checkpoint.get("resize_size")
    )["val"]
    mean = torch.tensor(checkpoint["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(checkpoint["std"], device=device).view(1, 3, 1, 1)
    workers = train.default_workers(device, 1) if args.workers is None else args.workers
    loader = DataLoader(
        ImageList(items, transform),
        args.batch_size,
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
    )

    predicted = []  # (item index, probabilities)
    with torch.inference_mode():
        for images, indices, bad in tqdm(loader, desc="predict", leave=False, dynamic_ncols=True):
            for image in bad:
                tqdm.write(f"warning: skipping {image.image}: {image.reason}", file=sys.stderr)
            if images is None:
                continue
            images = train.to_device(images, device, mean, std, channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(images)
            predicted += zip(indices.tolist(), logits.float().softmax(1).cpu())
    if not predicted:
        raise DataError(f"none of the {len(items)} images could be read")

    topk = min(args.topk, len(class_names))
    columns = ["image", "label", "confidence"]
    columns += [f"top{k}_{part}" for k in range(2, topk + 1) for part in ("label", "confidence")]
    shown = len(columns)  # stdout gets these; the file also gets one probability column per class
    columns += [f"p_{name}" if name in columns else name for name in class_names]
    rows, correct, labelled = [], 0, 0
    for index, probs in predicted:
        name, _, _, true_label = items[index]
        confidences, classes = probs.topk(topk)
        row = [name]
        for confidence, k in zip(confidences.tolist(), classes.tolist()):
            row += [class_names[k], f"{confidence:.6g}"]
        rows.append(row + [f"{p:.6g}" for p in probs.tolist()])
        if true_label is not None:
            labelled += 1
            correct += true_label == row[1]

    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([columns] + rows)
    train.write_atomically(args.out, lambda f: f.write(text.getvalue().encode()))
    printed = io.StringIO()
    csv.writer(printed, lineterminator="\n").writerows(row[:shown] for row in [columns] + rows)
    sys.stdout.write(printed.getvalue())
    skipped = len(items) - len(predicted)
    print(
        f"wrote {len(rows)} predictions to {args.out}" + (f" ({skipped} unreadable images skipped)" if skipped else ""),
        file=sys.stderr,
    )
    if labelled:
        print(f"accuracy {correct / labelled:.4f} ({correct}/{labelled} labelled images)", file=sys.stderr)
    return 0


def run_cli(argv=None) -> int:
    """Parse the command line and run; user mistakes become one `error:` line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(get_args_parser().parse_args(argv))
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_cli())
