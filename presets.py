"""All preprocessing, train and eval (torchvision's presets.py is the model): the transforms, the size each
decodes an image at, the one resize rule, the weights' mean/std, the normalisation that the torch and the ONNX
paths share, the progressive crop setter, and the Resize geometry that Grad-CAM maps are carried back through.

Both transforms end in uint8 CHW tensors: batches cross to the device as uint8 and are normalised there
(`normalize`), a quarter of the bytes of float32.
"""

import torch
import torchvision
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("basic", "trivial", "randaugment", "augmix")


def resize_size_for(image_size):
    """The validation Resize for a centre crop of `image_size`: ImageNet's 256 for 224."""
    return int(image_size * 256 / 224)


def train_decode_size(image_size):
    """The shorter side a training image is decoded at: RandomResizedCrop (scale 0.08 to 1) resizes its crop to
    image_size, and a crop covering at least a quarter of the image keeps full detail (see images.reduce_on_load)."""
    return 2 * image_size


def weights_preprocessing(model_name, weights_name, image_size):
    """(mean, std, validation resize) of torchvision weights `weights_name` (DEFAULT, IMAGENET1K_V1, ...) when
    they define them, scaled to `image_size`; ImageNet's constants and resize_size_for otherwise (no weights,
    a local .pth file: weights_name None)."""
    mean, std, resize_size = IMAGENET_MEAN, IMAGENET_STD, resize_size_for(image_size)
    if weights_name:
        try:
            preset = torchvision.models.get_model_weights(model_name)[weights_name.split(".")[-1]].transforms()
            mean, std = tuple(preset.mean), tuple(preset.std)
            resize_size = round(preset.resize_size[0] * image_size / preset.crop_size[0])
        except (KeyError, AttributeError, ValueError):
            pass
    return mean, std, resize_size


def train_transform(image_size, augment="basic", crop_scale=0.08, random_erasing=0.0):
    """The training transform, PIL image -> uint8 CHW tensor: RandomResizedCrop + flip, then the automatic
    augmentation `augment` names (on the uint8 tensor), then RandomErasing with probability `random_erasing`."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment {augment!r}: expected one of {', '.join(AUGMENTS)}")
    ops = [
        v2.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ]
    automatic = {"trivial": v2.TrivialAugmentWide, "randaugment": v2.RandAugment, "augmix": v2.AugMix}
    if augment in automatic:
        ops.append(automatic[augment]())
    if random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(ops)


def eval_transform(image_size, resize_size=None):
    """The validation, test and prediction transform: Resize (shorter side) + CenterCrop, to a uint8 tensor."""
    resize_size = resize_size or resize_size_for(image_size)
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size), v2.PILToTensor()])


TTA_MODES = ("crops", "flip")  # --tta: the five crops and their flips (10 views), or the centre crop and its flip


def tta_transform(image_size, resize_size, mode):
    """Test-time augmentation's transform: the eval_transform's Resize, then (V, 3, H, W) uint8 views: `crops`
    the four corner and the centre crops (FiveCrop) and their horizontal flips, `flip` the centre crop and its
    flip. The model's probabilities are averaged over them (models.forward_views)."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta {mode!r}: expected one of {', '.join(TTA_MODES)}")
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.PILToTensor(), _Views(image_size, mode)])


class _Views(torch.nn.Module):
    """A uint8 CHW image as its (V, 3, H, W) test-time views (a class, not a closure: worker processes that are
    spawned, as on macOS, receive the transform pickled)."""

    def __init__(self, image_size, mode):
        super().__init__()
        self.crop = v2.TenCrop(image_size) if mode == "crops" else v2.CenterCrop(image_size)

    def forward(self, image):
        crops = self.crop(image)
        if not isinstance(crops, (tuple, list)):  # the centre crop: add its flip
            crops = [crops, v2.functional.horizontal_flip(crops)]
        return torch.stack(list(crops))


def set_crop_size(transform, size):
    """Change, in place, the output size of the RandomResizedCrop in a train_transform Compose.

    The DataLoader's worker processes hold copies of the transform: this reaches them only when they are started
    after the change (workers that are not persistent start anew every epoch).
    """
    crops = [t for t in transform.transforms if isinstance(t, v2.RandomResizedCrop)]
    if len(crops) != 1:
        raise ValueError(f"expected one RandomResizedCrop in the transform, found {len(crops)}")
    crops[0].size = (size, size)


def normalize(images, mean, std):
    """A uint8 NCHW batch as the float batch the model takes: scaled to [0, 1], minus mean, over std (each
    (1, 3, 1, 1) on the batch's device). The one arithmetic of training, evaluation, predict.py and ONNX."""
    return images.float().div_(255).sub_(mean).div_(std)


def channel_constants(values, device=None):
    """Per-channel mean or std as the (1, 3, 1, 1) tensor `normalize` takes."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def resize_output_size(size, short_side):
    """(width, height) that torchvision's Resize(short_side) gives an image of `size`: the shorter side becomes
    short_side (smaller images are enlarged), the longer side is scaled and truncated."""
    width, height = size
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def resized_size(size, short_side):
    """resize_output_size, but never enlarging: `size` itself when its shorter side is not above short_side (the
    reduction images are decoded with, see images.reduce_on_load)."""
    return size if min(size) <= short_side else resize_output_size(size, short_side)


def center_crop_offsets(size, crop_size):
    """(top, left) of CenterCrop(crop_size) in an image of `size` (width, height), as torchvision computes them
    (negative where the crop is larger than the image and pads it)."""
    width, height = size
    return int(round((height - crop_size) / 2.0)), int(round((width - crop_size) / 2.0))
