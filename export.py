"""Export a checkpoint written by train.py for use outside this repository: ONNX, or a torch.export .pt2.

    python export.py runs/exp1/best.pt                      # writes runs/exp1/best.onnx
    python export.py runs/exp1/best.pt --format pt2         # writes runs/exp1/best.pt2
    python export.py runs/exp1/best.pt --out deploy/model.onnx

The exported model takes a float32 batch of shape (N, 3, image_size, image_size), any N, already
preprocessed, and returns logits (N, classes); softmax(logits / temperature) gives the calibrated
probabilities, and "operating_point" the frozen per-class thresholds applied to them (a multi-label model:
sigmoid per class, and a class is predicted when its probability reaches its threshold in "thresholds"). The
file carries everything a consumer needs as one JSON value: the class names, image_size, resize_size, mean and
std, multi_label, thresholds, temperature and operating_point (ONNX: the model's metadata_props entry
"classifier"; .pt2: the extra file "classifier.json"). Preprocessing: convert to RGB, resize the shorter side
to resize_size (bilinear, antialiased), centre-crop image_size, scale to [0, 1], subtract mean and divide by
std per channel.

After writing, the export checks itself: ONNX Runtime (or the reloaded .pt2) and PyTorch run the same random
batches of 1 and 3 images, and the largest difference relative to the largest logit must stay under 1e-3;
otherwise nothing is written and the exit status is 1.
"""

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import cli
import run_files
from devices import make_context, to_device
from errors import UsageError, one_line
from exported import INPUT_NAME, METADATA_KEY, OUTPUT_NAME, import_onnxruntime, metadata_of
from files import WriteError, move_into_place
from models import model_from_checkpoint

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
TOLERANCE = 1e-3  # largest relative difference the self-check accepts; fp32 exports measure around 1e-6
CHECK_BATCHES = (1, 3)  # batch 1 separately: torch.export treats sizes 0 and 1 specially


class ExportError(Exception):
    """The exporter failed, or the exported model does not compute what the checkpoint does (exit status 1)."""


def get_args_parser():
    parser = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="best.pt or last.pt from a train.py run")
    parser.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="onnx (ONNX Runtime, TensorRT, OpenVINO, browsers, phones) or pt2 (torch.export, for AOTInductor and "
        "ExecuTorch); default: from --out's extension, else onnx",
    )
    parser.add_argument("--out", default=None, help="file to write (default: beside the checkpoint, best.onnx/.pt2)")
    return parser


def output_path(args):
    """(format, --out): the format follows --out's extension when --format is not given."""
    suffix = Path(args.out).suffix.lower() if args.out else ""
    named = next((name for name, ext in FORMATS.items() if ext == suffix), None)
    fmt = args.format or named or "onnx"
    if named and named != fmt:
        raise UsageError(f"--out {args.out}: a {suffix} name for --format {fmt}; name it *{FORMATS[fmt]}")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(FORMATS[fmt])
    if out.resolve() == Path(args.checkpoint).resolve():
        raise UsageError(f"--out {out}: that is the checkpoint itself; choose another name")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name such as {out / ('model' + FORMATS[fmt])}")
    if not out.parent.is_dir():
        reason = "is not a folder" if out.parent.exists() else "no such folder"
        raise UsageError(f"--out {out}: {out.parent} {reason}")
    return fmt, out


def random_batch(checkpoint, ctx, size, seed=0):
    """`size` random images, normalised exactly as predict.py normalises real ones."""
    s = checkpoint["image_size"]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, s, s), dtype=torch.uint8, generator=generator)
    return to_device(images, ctx).contiguous()


def export_onnx(model, example, path, metadata):
    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),  # any batch size; torch.export's Dim, as dynamo=True expects
            dynamo=True,
            verbose=False,  # no progress lines on stdout
        )
    except Exception as e:
        raise ExportError(f"could not export {metadata['model_name']} to ONNX: {one_line(e)[:200]}") from None
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    # Over 2 GB (vit_h_14, regnet_y_128gf) the weights go to a `<name>.data` file beside the model.
    program.save(path)


def run_onnx(path):
    """A function from a float batch to logits, through ONNX Runtime on the CPU."""
    onnxruntime = import_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {one_line(e)[:200]}") from None
    return lambda batch: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0])


def export_pt2(model, example, path, metadata):
    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:
        raise ExportError(f"could not export {metadata['model_name']} with torch.export: {one_line(e)[:200]}") from None
    torch.export.save(program, path, extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def run_pt2(path):
    """A function from a float batch to logits, through the .pt2 loaded back as a consumer would load it."""
    try:
        module = torch.export.load(path).module()
    except Exception as e:
        raise ExportError(f"torch.export.load cannot load the exported model: {one_line(e)[:200]}") from None
    return lambda batch: module(batch)


def largest_difference(model, run_exported, batches):
    """max |exported - PyTorch| / max |PyTorch| over the batches: relative to the logits' scale, because a
    difference relative to each logit is meaningless for the ones near zero."""
    differences, scales = [], []
    with torch.inference_mode():
        for batch in batches:
            expected = model(batch).float()
            got = run_exported(batch).float()
            if got.shape != expected.shape:
                raise ExportError(f"the exported model gives shape {list(got.shape)}, PyTorch {list(expected.shape)}")
            differences.append((got - expected).abs().max())
            scales.append(expected.abs().max())
    # torch's max, unlike Python's, keeps a NaN, so NaN outputs fail the check
    return (torch.stack(differences).max() / torch.stack(scales).max().clamp(min=1e-12)).item()


def publish(folder, out):
    """Move the checked files from the temporary folder into place, the model file last: until it lands, an
    earlier export at --out stays whole."""
    move_into_place(sorted(folder.iterdir(), key=lambda p: p.name == out.name), out.parent)


def main(args):
    if Path(args.checkpoint).suffix.lower() in FORMATS.values():
        raise UsageError(f"checkpoint {args.checkpoint}: already exported; export the best.pt it came from")
    checkpoint = run_files.load_run_checkpoint(args.checkpoint, "checkpoint")  # weights_only: no pickled code
    fmt, out = output_path(args)
    ctx = make_context(torch.device("cpu"), "off", checkpoint["mean"], checkpoint["std"])  # fp32
    model = model_from_checkpoint(checkpoint, f"checkpoint {args.checkpoint}", ctx)
    # Plain layout: files hold no memory format, and channels_last weights make torch.export.load warn.
    model.to(memory_format=torch.contiguous_format)
    metadata = metadata_of(checkpoint)
    exporters = {"onnx": (export_onnx, run_onnx, "ONNX Runtime"), "pt2": (export_pt2, run_pt2, "the reloaded .pt2")}
    export, load_exported, runtime = exporters[fmt]

    # Written to a hidden folder beside --out and moved into place only once checked: a failed or interrupted
    # export leaves no half-written or wrong file. Made first, so an unwritable --out fails before the export.
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        example = random_batch(checkpoint, ctx, 2)  # 2, not 1: torch.export would fix a batch of 1 as a constant
        # Some models print notes while tracing; the user only needs to know what was written.
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                export(model, example, folder / out.name, metadata)
        except OSError as e:  # saving it: a full disk, a vanished folder
            raise UsageError(f"could not write {out}: {e.strerror or e}") from None
        batches = [random_batch(checkpoint, ctx, size, seed=size) for size in CHECK_BATCHES]
        difference = largest_difference(model, load_exported(folder / out.name), batches)
        images = " and ".join(str(size) for size in CHECK_BATCHES)
        print(f"checked: {runtime} vs PyTorch on batches of {images} random images: ", end="")
        print(f"largest relative difference {difference:.2g} (limit {TOLERANCE:g})")
        if not difference <= TOLERANCE:  # `not <=`: a NaN difference fails too
            raise ExportError(f"the exported model differs from the checkpoint's; {out} not written")
        publish(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    size_mb = out.stat().st_size / 1e6
    s, classes = checkpoint["image_size"], len(checkpoint["class_names"])
    print(f"wrote {out} ({size_mb:.1f} MB): {INPUT_NAME} float32 [N, 3, {s}, {s}] -> {OUTPUT_NAME} [N, {classes}]")
    return 0


def run_cli(argv=None) -> int:
    """Parse the command line and run; user mistakes are one `error:` line and exit status 2, a failed export 1."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(get_args_parser().parse_args(argv))
    except (UsageError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_cli())
