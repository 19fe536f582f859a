"""Predict classes for images with a checkpoint written by train.py.

    python predict.py runs/exp1/best.pt photo.jpg more_photos/            # files and folders (recursive)
    python predict.py runs/exp1/best.pt new.csv --root images --topk 3    # a CSV with an 'image' column
    python predict.py runs/exp1/best.onnx photo.jpg                       # through ONNX Runtime (export.py)

Writes --out (a CSV): image, label, confidence, [top2_label, top2_confidence, ... up to --topk], then one
probability column per class, named by the class (prefixed 'p_' if a class name clashes with a column above).
The same rows without the probability columns are printed to stdout; messages go to stderr. For a CSV that
also has a 'label' column, the accuracy on it is reported. Preprocessing is the checkpoint's validation
transform, so predicting a run's validation images reproduces its validation accuracy (given the same --amp).
Inference is fp32 unless --amp asks otherwise, so best.pt and best.onnx give the same confidences.

The probabilities are calibrated by the temperature the run fitted on its validation images, and a column
`decision` says what the run's frozen operating point decides (a binary model: the class at its threshold;
multi-class: the classes at or above their one-vs-rest thresholds, joined by ';'). --tta averages each image's
probabilities over its flipped (and five-crop) views, at 2 or 10 times the cost.

A multi-label model writes image, labels (the classes whose probability reaches their threshold, as 'a;b',
empty for none), then one probability column per class. The thresholds are those the run chose on its
validation images (saved in best.pt and the export), or --threshold for every class.
"""

import argparse
import collections
import csv
import io
import sys
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

import cam
import cli
import decision
import exported
import presets
import run_files
from dataset import BadImageLog, MyDataset, loader_options
from devices import choose_device, loader_workers, make_context, to_device
from errors import DataError, UsageError, one_line
from files import WriteError, write_atomically
from images import IMAGE_EXTENSIONS, is_image_file, resolve_image_path, upright_size
from labels import LABEL_SEP, MISSING_LABELS, label_set, read_images
from metrics import DEFAULT_THRESHOLD
from models import forward_views, model_from_checkpoint
from models import probabilities as probabilities_of


def get_args_parser():
    parser = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="best.pt or last.pt from a train.py run, or a .onnx from export.py")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or CSV files")
    parser.add_argument("--out", default=None, help="CSV to write (default: predictions.csv beside the checkpoint)")
    parser.add_argument("--topk", type=int, default=1, help="also list the K best classes, as topN_label/_confidence")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--amp", choices=["auto", "bf16", "fp16", "off"], default="off", help="mixed precision (default: exact fp32)"
    )
    parser.add_argument(
        "--cam", metavar="DIR", help="also write Grad-CAM overlays and heat maps of each image into DIR"
    )
    parser.add_argument("--cam-class", metavar="NAME", help="with --cam, map this class instead of the predicted one")
    parser.add_argument(
        "--threshold", type=cli.FRACTION, help="multi-label: one threshold for all (default: the run's)"
    )
    parser.add_argument(
        "--tta",
        nargs="?",
        const="crops",
        choices=presets.TTA_MODES,
        help="average the five crops and their flips (alone), or the image and its flip (flip)",
    )
    parser.add_argument("--image-col", default="image", help="column of image paths in CSV inputs")
    parser.add_argument("--root", default=None, help="folder CSV image paths are relative to (default: the CSV's)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: fitted)")
    return parser


def collect_images(inputs, image_col, root):
    """Everything to predict, in order: a list of (samples, root) where samples has image, label, line columns;
    root is None for files named or found in folders (their paths are used as they are)."""
    groups = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            # Hidden files are skipped: macOS '._x.jpg' metadata files are not images despite their name.
            found = sorted(
                p
                for p in path.rglob("*")
                if is_image_file(p)
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            groups.append((unlabelled([str(p) for p in found]), None))
        elif path.suffix.lower() == ".csv" and path.is_file():
            # label: the 'label' column's text, read as a class or a label set once the model says which
            groups.append((read_images(path, image_col), Path(root) if root else path.parent))
        elif path.exists():
            groups.append((unlabelled([arg]), None))  # named explicitly: tried whatever its extension
        else:
            raise UsageError(f"{arg}: no such file or folder")
    if not sum(len(samples) for samples, _ in groups):
        extensions = ", ".join(IMAGE_EXTENSIONS)
        raise UsageError(f"no images found in {', '.join(inputs)} (looked for {extensions} files, or CSV rows)")
    return groups


def unlabelled(paths):
    return pd.DataFrame({"image": paths, "label": None, "line": 0})


def load_predictor(path, args):
    """(a function from a uint8 image batch to (class probabilities, Grad-CAM maps or None), the model's
    preprocessing and classes, the device)."""
    if Path(path).suffix.lower() == ".onnx":
        if args.cam:
            raise UsageError(f"--cam needs a .pt checkpoint: {path} is ONNX, which has no gradients to map")
        return load_onnx_predictor(path, args)
    device = choose_device(args.device)
    checkpoint = run_files.load_run_checkpoint(path, "checkpoint")  # weights_only=True: never runs pickled code
    ctx = make_context(device, args.amp, checkpoint["mean"], checkpoint["std"])
    model = model_from_checkpoint(checkpoint, f"checkpoint {path}", ctx)
    grad_cam = None
    if args.cam:
        class_names = list(checkpoint["class_names"])
        if args.cam_class is not None and args.cam_class not in class_names:
            raise UsageError(f"--cam-class {args.cam_class}: not a class of {path} ({', '.join(class_names[:10])})")
        target = None if args.cam_class is None else class_names.index(args.cam_class)
        grad_cam = cam.GradCam(model, checkpoint["model_name"], checkpoint["image_size"], target,
                               checkpoint.get("multi_label", False), checkpoint.get("temperature"))  # fmt: skip
    multi_label, temperature = checkpoint.get("multi_label"), checkpoint.get("temperature")

    def probabilities(images):
        with torch.autocast(device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
            if grad_cam is not None:
                return grad_cam.maps(to_device(images, ctx))  # the same forward gives both
            logits = forward_views(model, images, lambda x: to_device(x, ctx), multi_label)
            return probabilities_of(logits, multi_label, temperature).cpu(), None

    return probabilities, checkpoint, device


def load_onnx_predictor(path, args):
    """load_predictor for a model written by export.py, run by ONNX Runtime: the classes and preprocessing come
    from its metadata, so the predictions are those of the checkpoint it came from (run with --amp off)."""
    onnxruntime = exported.import_onnxruntime()
    if args.amp not in ("auto", "off"):
        raise UsageError(f"--amp {args.amp}: an ONNX model runs in the precision it was exported in (float32)")
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path}: no such file")
    device = choose_device(args.device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    elif device.type != "cpu":
        if args.device != "auto":
            raise UsageError(f"--device {args.device}: this onnxruntime runs .onnx models on the CPU only")
        device = torch.device("cpu")  # auto: the CPU is what this onnxruntime has
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        raise UsageError(f"checkpoint {path}: not an ONNX model ONNX Runtime can load ({one_line(e)[:150]})") from None
    text = session.get_modelmeta().custom_metadata_map.get(exported.METADATA_KEY)
    if text is None:
        raise UsageError(f"checkpoint {path}: has no classes or preprocessing in its metadata; make it with export.py")
    info = exported.check_metadata(text, f"checkpoint {path}")
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    mean, std = presets.channel_constants(info["mean"]), presets.channel_constants(info["std"])

    def run_session(batch):
        return torch.from_numpy(session.run([output_name], {input_name: batch.numpy()})[0])

    def prepare(images):  # the numbers the model sees from best.pt too
        return presets.normalize(images, mean, std).contiguous()

    def probabilities(images):
        logits = forward_views(run_session, images, prepare, info.get("multi_label"))  # --tta: all views at once
        return probabilities_of(logits, info.get("multi_label"), info.get("temperature")), None

    return probabilities, info, device


class CamFiles:
    """--cam DIR: for each image, DIR/<name>_cam.jpg (the image as the model saw it with the heat map blended
    on, the mapped class and its probability written on it) and DIR/<name>_heat.png (the map alone in the
    original file's upright pixel grid, 255 = hottest, 0 where the centre crop cut it off). <name> is the file
    name without its extension, with the row number added when two images share one."""

    def __init__(self, folder, groups, class_names, checkpoint, cam_class=None):
        self.folder, self.class_names, self.checkpoint = Path(folder), class_names, checkpoint
        self.target = None if cam_class is None else class_names.index(cam_class)
        self.paths = [
            resolve_image_path(root, image) if root is not None else Path(image)
            for samples, root in groups
            for image in samples["image"]
        ]
        stems = [path.stem for path in self.paths]
        repeated = {stem for stem, count in collections.Counter(stems).items() if count > 1}
        self.names = [f"{stem}_{row}" if stem in repeated else stem for row, stem in enumerate(stems)]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--cam {folder}: cannot create it ({e.strerror or e})") from None

    def write(self, rows, images, probabilities, maps):
        sizes = (self.checkpoint["resize_size"], self.checkpoint["image_size"])
        for row, image, probs, heat in zip(rows, cam.overlay(images, maps), probabilities, maps):
            mapped = int(probs.argmax()) if self.target is None else self.target
            overlay = cam.captioned(image, f"{self.class_names[mapped]} {float(probs[mapped]):.0%}")
            self.save(f"{self.names[row]}_cam.jpg", overlay, "JPEG")
            self.save(
                f"{self.names[row]}_heat.png",
                cam.in_original_grid(heat, upright_size(self.paths[row]), *sizes),
                "PNG",
            )

    def save(self, name, picture, image_format):
        write_atomically(self.folder / name, lambda f: picture.save(f, image_format, quality=90))


def main(args):
    for flag, value, least in (("--topk", args.topk, 1), ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if args.tta and args.cam:
        raise UsageError("--cam maps what the model sees in one view; drop --tta for --cam")
    if args.cam_class is not None and not args.cam:
        raise UsageError("--cam-class chooses the class --cam maps; add --cam DIR")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must not be negative, got {args.workers}")
    groups = collect_images(args.images, args.image_col, args.root)  # first: input mistakes show up at once
    probabilities, checkpoint, device = load_predictor(args.checkpoint, args)
    class_names = list(checkpoint["class_names"])
    if args.threshold is not None and not checkpoint.get("multi_label"):
        raise UsageError(f"--threshold is for multi-label models; {args.checkpoint} picks the most probable class")

    # Exactly the validation preprocessing of the run: same reduction, resize, crop and normalisation.
    resize_size = checkpoint["resize_size"]
    transform = presets.eval_transform(checkpoint["image_size"], resize_size)
    if args.tta:
        transform = presets.tta_transform(checkpoint["image_size"], resize_size, args.tta)
    datasets, start = [], 0
    # the training run's --window, as in its validation (an exported model carries it in its metadata)
    window = checkpoint["args"].get("window") if "args" in checkpoint else checkpoint.get("window")
    for samples, root in groups:
        data = MyDataset(
            samples, root, class_names, transform, short_side=resize_size, row_numbers_from=start, window=window
        )
        datasets.append(data)
        start += len(data)
    items = pd.concat([samples for samples, _ in groups], ignore_index=True)
    workers = loader_workers(args.workers, device)
    loader = DataLoader(
        ConcatDataset(datasets),
        args.batch_size,
        **loader_options(workers, device),
    )

    predicted = []  # (item index, probabilities)
    cam_files = CamFiles(args.cam, groups, class_names, checkpoint, args.cam_class) if args.cam else None
    with torch.inference_mode(not args.cam):  # Grad-CAM needs gradients
        bar = tqdm(loader, desc="predict", leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
        bad_images = BadImageLog(skip=True)  # each unreadable image said once, with its CSV line
        for images, rows, bad in bar:
            bad_images.handle(bad)
            if images is not None:
                batch_probabilities, maps = probabilities(images)
                predicted += zip(rows.tolist(), batch_probabilities)
                if cam_files is not None:
                    cam_files.write(rows.tolist(), images, batch_probabilities, maps)
    if not predicted:
        raise DataError(f"none of the {len(items)} images could be read")

    if checkpoint.get("multi_label"):
        return write_label_sets(args, checkpoint, predicted, items)
    topk = min(args.topk, len(class_names))
    columns = ["image", "label", "confidence"]
    columns += [f"top{k}_{part}" for k in range(2, topk + 1) for part in ("label", "confidence")]
    point = checkpoint.get("operating_point")  # frozen on the run's validation images
    if point is not None:
        columns.append("decision")
        decided = decision.decision_names(torch.stack([probs for _, probs in predicted]), point, class_names)
    shown = len(columns)  # stdout gets these; the file also gets one probability column per class
    columns += [f"p_{name}" if name in columns else name for name in class_names]
    rows, correct, labelled = [], 0, 0
    for n, (index, probs) in enumerate(predicted):
        name, true_label = items["image"][index], items["label"][index]
        confidences, classes = probs.topk(topk)
        row = [name]
        for confidence, k in zip(confidences.tolist(), classes.tolist()):
            row += [class_names[k], f"{confidence:.6g}"]
        row += [decided[n]] if point is not None else []
        rows.append(row + [f"{p:.6g}" for p in probs.tolist()])
        if true_label and true_label.lower() not in MISSING_LABELS:  # an unlabelled row is not scored
            labelled += 1
            correct += true_label == row[1]

    write_rows(args, columns, rows, shown, len(items) - len(predicted))
    if labelled:
        print(f"accuracy {correct / labelled:.4f} ({correct}/{labelled} labelled images)", file=sys.stderr)
    return 0


def write_label_sets(args, checkpoint, predicted, items):
    """The multi-label rows: image, labels (those at or above their class's threshold), p per class."""
    class_names = list(checkpoint["class_names"])
    thresholds = [args.threshold] * len(class_names) if args.threshold is not None else checkpoint.get("thresholds")
    thresholds = torch.tensor(thresholds or [DEFAULT_THRESHOLD] * len(class_names))
    columns = ["image", "labels", *(f"p_{name}" if name in ("image", "labels") else name for name in class_names)]
    rows, correct, labelled = [], 0, 0
    for index, probs in predicted:
        chosen = [name for name, on in zip(class_names, (probs >= thresholds).tolist()) if on]
        rows.append([items["image"][index], LABEL_SEP.join(chosen), *(f"{p:.6g}" for p in probs.tolist())])
        true_label = items["label"][index]
        if true_label is not None:  # a 'label' column of sets such as 'a;b': exact-match accuracy
            labelled += 1
            correct += {name.strip() for name in label_set(true_label)} - {""} == set(chosen)
    write_rows(args, columns, rows, 2, len(items) - len(predicted))
    if labelled:
        print(f"exact-match accuracy {correct / labelled:.4f} ({correct}/{labelled} labelled images)", file=sys.stderr)
    return 0


def write_rows(args, columns, rows, shown, skipped):
    """--out gets every column; stdout the first `shown`."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([columns] + rows)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "predictions.csv"
    write_atomically(out, lambda f: f.write(text.getvalue().encode()))
    printed = io.StringIO()
    csv.writer(printed, lineterminator="\n").writerows(row[:shown] for row in [columns] + rows)
    sys.stdout.write(printed.getvalue())
    print(
        f"wrote {len(rows)} predictions to {out}" + (f" ({skipped} unreadable images skipped)" if skipped else ""),
        file=sys.stderr,
    )


def run_cli(argv=None) -> int:
    """Parse the command line and run; user mistakes become one `error:` line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(get_args_parser().parse_args(argv))
    except (UsageError, DataError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_cli())
