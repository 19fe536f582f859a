"""What an exported model (export.py's .onnx or .pt2) carries besides its weights, and how it is run: the
metadata JSON (classes, preprocessing, thresholds, temperature and operating point), checked when read, and
ONNX Runtime's import. export.py writes it, predict.py reads it."""

import json

from errors import UsageError, one_line

METADATA_KEY = "classifier"  # ONNX metadata_props key; the .pt2 holds the same JSON as "classifier.json"
METADATA_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def metadata_of(checkpoint):
    """What a consumer of the exported model needs besides the model: classes and preprocessing, as plain JSON."""
    return {
        "version": METADATA_VERSION,
        "model_name": checkpoint["model_name"],
        "class_names": [str(name) for name in checkpoint["class_names"]],
        "image_size": int(checkpoint["image_size"]),
        "resize_size": int(checkpoint["resize_size"]),
        "mean": [float(x) for x in checkpoint["mean"]],
        "std": [float(x) for x in checkpoint["std"]],
        "multi_label": bool(checkpoint.get("multi_label", False)),  # sigmoid per class instead of softmax
        "thresholds": checkpoint.get("thresholds"),  # multi-label: predicted when probability >= threshold
        "temperature": checkpoint.get("temperature"),  # softmax(logits / temperature): calibrated probabilities
        # single-label: {"rule", "thresholds" per class (None: none), "positive"}, applied to those probabilities
        "operating_point": checkpoint.get("operating_point"),
        "window": checkpoint.get("args", {}).get("window"),  # --window: DICOM / 16-bit grey values windowed first
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "preprocessing": "RGB; resize the shorter side to resize_size (bilinear, antialiased); centre-crop "
        "image_size; scale to [0, 1]; subtract mean, divide by std; float32 NCHW",
    }


def check_metadata(text, source):
    """The metadata JSON an exported model carries, checked to hold what predicting needs."""
    try:
        meta = json.loads(text)
        names, size, resize = meta["class_names"], int(meta["image_size"]), int(meta["resize_size"])
        mean, std = [float(x) for x in meta["mean"]], [float(x) for x in meta["std"]]
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{source}: its '{METADATA_KEY}' metadata is damaged ({one_line(e)[:100]})") from None
    if not names or len(mean) != 3 or len(std) != 3:
        raise UsageError(f"{source}: its '{METADATA_KEY}' metadata is damaged (no classes, or not 3 channels)")
    return dict(meta, class_names=list(names), image_size=size, resize_size=resize, mean=mean, std=std)


def import_onnxruntime():
    """onnxruntime, imported only when needed: training and predicting from checkpoints do without it."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("onnxruntime is not installed; pip install -r requirements.txt") from None
    return onnxruntime
