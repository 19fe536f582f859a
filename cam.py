"""Where the model looks: Grad-CAM heat maps (captum's LayerGradCam) for predict.py --cam and the run folder's
val_cam.jpg.

The map is taken at the model's last spatial feature map before pooling (`target_layer`), for the predicted
class or a chosen one. One forward and one backward per batch give both the probabilities and the maps: the
model is wrapped so that its output is the chosen class's logit, and the full logits are kept on the way.
Vision transformers (ViT, Swin) have token maps, not a feature map: they are refused in one line.
"""

import sys

import torch
import torch.nn as nn

import models
import presets
from errors import UsageError, one_line

TOKEN_MODELS = ("vit_", "swin_", "swin3d")


class ChosenLogit(nn.Module):
    """`model` whose output is one logit per image: of `target` (a class index, or one per image), or of the
    predicted class when target is None. The full logits of the last call are kept in `.logits`."""

    def __init__(self, model, target=None):
        super().__init__()
        self.model, self.target, self.logits = model, target, None

    def forward(self, images):
        logits = self.model(images)
        self.logits = logits.detach()
        if self.target is None:
            chosen = logits.argmax(1)
        else:  # one class for all, or one per image
            chosen = torch.as_tensor(self.target, device=logits.device).long().expand(len(logits))
        return logits.gather(1, chosen[:, None]).squeeze(1)


def target_layer(model, model_name, image_size):
    """The module whose output is the last spatial feature map (N, C, H, W with H, W > 1) a forward pass
    computes: layer4 of a ResNet, features of a VGG, DenseNet or EfficientNet."""
    if model_name.startswith(TOKEN_MODELS):
        raise UsageError(f"--cam: {model_name} works on patch tokens, not a feature map; Grad-CAM needs a CNN")
    finished = []  # modules, in the order their forward returned a spatial map

    def record(module, inputs, output):
        pooling = isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))  # VGG's: 7x7 whatever the size
        if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[2:]) > 1 and not pooling:
            finished.append(module)

    hooks = [module.register_forward_hook(record) for name, module in model.named_modules() if name]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    if not finished:
        raise UsageError(f"--cam: {model_name} has no spatial feature map at --image-size {image_size}")
    return finished[-1]


class GradCam:
    """Grad-CAM maps of a batch: `maps(images)` -> (probabilities (N, C), maps (N, S, S) in [0, 1] at the input
    size, 1 = hottest), for `target` or each image's most probable class. A multi-label model's probabilities
    are each class's sigmoid, as predict.py gives them without --cam; a calibrated model's are at its
    `temperature`."""

    def __init__(self, model, model_name, image_size, target=None, multi_label=False, temperature=None):
        from captum.attr import LayerGradCam

        self.multi_label, self.temperature = multi_label, temperature
        self.chosen = ChosenLogit(model.eval(), target)
        self.grad_cam = LayerGradCam(self.chosen, target_layer(model, model_name, image_size))

    def maps(self, batch):
        from captum.attr import LayerAttribution

        with torch.enable_grad():
            attributions = self.grad_cam.attribute(batch, relu_attributions=True)
        maps = LayerAttribution.interpolate(attributions.float(), tuple(batch.shape[2:]), "bilinear")[:, 0]
        peak = maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
        logits = self.chosen.logits.float()
        probabilities = models.probabilities(logits, self.multi_label, self.temperature)
        return probabilities.cpu(), (maps / peak).clamp(0, 1).detach().cpu()


def colour_map(maps):
    """(N, H, W) maps in [0, 1] -> (N, 3, H, W) uint8 in matplotlib's 'jet' colours."""
    from matplotlib import colormaps

    return torch.from_numpy(colormaps["jet"](maps.numpy(), bytes=True)[..., :3]).permute(0, 3, 1, 2).contiguous()


def overlay(images, maps, alpha=0.45):
    """The images (uint8 N×3×H×W, as the model saw them) with their heat maps blended on top."""
    return (images.float() * (1 - alpha) + colour_map(maps).float() * alpha).round().to(torch.uint8)


def in_original_grid(heat, original_size, resize_size, crop_size):
    """A map over the centre crop (S×S in [0, 1]) as an 8-bit greyscale PIL image of `original_size` (width,
    height, upright), 255 = hottest, 0 where the crop cut the image off: the validation transform undone."""
    from PIL import Image

    width, height = presets.resize_output_size(original_size, resize_size)  # the validation transform's Resize
    canvas = torch.zeros(height, width)
    top, left = presets.center_crop_offsets((width, height), crop_size)
    canvas[max(top, 0) : top + crop_size, max(left, 0) : left + crop_size] = heat[
        max(-top, 0) : height - top, max(-left, 0) : width - left
    ]
    grey = Image.fromarray((canvas * 255).round().to(torch.uint8).numpy())  # 2-D uint8: mode L
    return grey.resize(original_size, Image.Resampling.BILINEAR)


def captioned(image, caption):
    """A uint8 3×H×W image as a PIL image with `caption` written in its top-left corner on a dark band."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.textbbox((3, 2), caption)
    draw.rectangle((0, 0, right + 3, bottom + 2), fill=(0, 0, 0))
    draw.text((3, 2), caption, fill=(255, 255, 255))
    return picture


def draw_val_cam(model, model_name, to_device, predictions, data, max_images=32):
    """val_cam.jpg, rendered (a plots.Picture): val_predictions.jpg's images (mistakes first) with best.pt's
    Grad-CAM map of the class it predicted blended on each (`model` holds best.pt's weights). A failure is one
    warning line and None, never a failed run."""
    import plots

    try:
        images, true, predicted, confidence = plots.worth_seeing(predictions, data, max_images)
        images = torch.stack(images)
        grad_cam = GradCam(model, model_name, images.shape[-1], target=predicted)
        _, maps = grad_cam.maps(to_device(images))
    except Exception as e:
        print(f"warning: could not draw val_cam.jpg ({type(e).__name__}: {one_line(e)})", file=sys.stderr)
        return None
    return plots.draw_predictions(overlay(images, maps), true, predicted, confidence, data.class_names,
                                  name="val_cam.jpg")  # fmt: skip
