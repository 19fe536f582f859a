"""The network: a torchvision classification model with its head replaced, its pretrained weights (a torchvision
weights name or a local .pth file), the trained model a checkpoint holds, and `probabilities`, the one switch
between softmax (one class per image) and sigmoid (multi-label)."""

import difflib
import math
import os
import re

import torch
import torch.nn as nn
import torchvision

from errors import UsageError, one_line
from run_files import load_checkpoint


def build_model(model_name, num_classes, weights=None, freeze_backbone=False):
    """A torchvision classification model with its head replaced for `num_classes`, after loading weights."""
    known = torchvision.models.list_models(module=torchvision.models)
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise UsageError(f"--model {model_name}: not a torchvision classification model; {hint}")
    # Auxiliary heads serve only googlenet's and inception_v3's own recipes; init_weights=True: their default, unwarned
    kwargs = {"aux_logits": False, "init_weights": True} if model_name in ("googlenet", "inception_v3") else {}
    from_file = weights is not None and is_weights_file(weights)
    pretrained = torchvision_weights(model_name, weights) if weights is not None and not from_file else None
    model = torchvision.models.get_model(model_name, weights=pretrained, **kwargs)
    # The head is the last Linear or Conv2d in every torchvision model (squeezenet's is a 1x1 convolution).
    head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    if from_file:
        load_weights_file(model, weights, head_name, model_name)
    if isinstance(head, nn.Linear):
        model.set_submodule(head_name, nn.Linear(head.in_features, num_classes))
    else:
        model.set_submodule(head_name, nn.Conv2d(head.in_channels, num_classes, kernel_size=1))
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head_name + ".")
    return model


def model_from_checkpoint(checkpoint, source, ctx):
    """The trained model a checkpoint holds, on the context's device, ready for evaluation."""
    model = build_model(checkpoint["model_name"], len(checkpoint["class_names"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"{source}: weights do not fit {checkpoint['model_name']} ({one_line(e)[:150]})") from None
    model.to(ctx.device, memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    return model.eval()


def check_input_size(model, model_name, image_size):
    """Fail now, not after the first batch, when --image-size is too small for the architecture."""
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as e:
        reason = one_line(e)[:100]
        raise UsageError(f"--image-size {image_size} does not fit {model_name} ({reason}); use a larger size") from None


def probabilities(logits, multi_label, temperature=None):
    """What the model's outputs say of each class: a softmax over the classes, or each class's sigmoid for a
    multi-label model; softmax(logits / temperature) for a calibrated single-label model (decision.py)."""
    if multi_label:
        return logits.sigmoid()
    return (logits / temperature if temperature else logits).softmax(1)


def forward_views(model, images, prepare, multi_label):
    """The model's outputs (float32) for a uint8 batch, `prepare` turning NCHW uint8 into the model's input (see
    devices.to_device): (B, C) for NCHW images; for test-time augmentation's (B, V, 3, H, W) views
    (presets.tta_transform), all views in one forward, combined by average_views."""
    if images.ndim == 4:
        return model(prepare(images)).float()
    views = images.shape[1]
    return average_views(model(prepare(images.flatten(0, 1))).float().unflatten(0, (-1, views)), multi_label).float()


def average_views(logits, multi_label):
    """(B, C) outputs from (B, V, C) logits of V views, whose probabilities are the mean of the views': the log
    of the mean softmax (its own softmax is that mean), or multi-label the logit of the mean sigmoid."""
    if multi_label:
        mean = logits.double().sigmoid().mean(1)
        return mean.log() - (-mean).log1p()
    return logits.double().log_softmax(2).logsumexp(1) - math.log(logits.shape[1])


def torchvision_weights_name(weights):
    """--weights as a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), or None for none or a local file."""
    return weights if weights and not is_weights_file(weights) else None


def load_state_dict(path, flag):
    """The weights in a local file: a plain state dict, or the model of one of our checkpoints. The prefixes
    that DDP and torch.compile add to the names ('module.', '_orig_mod.') are removed."""
    state = load_checkpoint(path, flag)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{flag} {path}: not a state dict of tensors")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def load_weights_file(model, path, head_name, model_name):
    """Load --weights, a local state dict (or one of our checkpoints), into `model`, all but a head (the layer
    `head_name`) of another shape: the head is replaced anyway, a different class count must not stop fine-tuning."""
    state, own = load_state_dict(path, "--weights"), model.state_dict()
    head = head_name + "."
    state = {k: v for k, v in state.items() if not (k.startswith(head) and k in own and v.shape != own[k].shape)}
    problems = [f"missing {k}" for k in own if k not in state and not k.startswith(head)]
    problems += [
        f"unexpected {k}" for k in state if k not in own and not k.startswith(("AuxLogits.", "aux1.", "aux2."))
    ]
    problems += [f"shape of {k}" for k in state if k in own and state[k].shape != own[k].shape]
    if problems:
        raise UsageError(f"--weights {path}: does not fit {model_name} ({problems[0]}); is it for another --model?")
    model.load_state_dict(state, strict=False)


def is_weights_file(weights):
    """A --weights value is a local file (rather than a torchvision weights name such as DEFAULT)."""
    return weights.endswith((".pth", ".pt", ".bin")) or "/" in weights or os.sep in weights or os.path.isfile(weights)


def torchvision_weights(model_name, weights):
    """The torchvision weights enum member --weights names, downloaded (or found in torch's cache) now."""
    import torchvision

    enum = torchvision.models.get_model_weights(model_name)
    name = weights.split(".")[-1]
    if name not in enum.__members__:
        choices = ", ".join(enum.__members__)
        raise UsageError(f"--weights {weights}: {model_name} has no such weights; choose from {choices} or a .pth file")
    weight = enum[name]
    try:
        weight.get_state_dict(progress=False, check_hash=True)  # downloaded once, then read from torch's cache
    except Exception as e:
        hint = "download it elsewhere and pass the .pth file"
        raise UsageError(f"--weights {weights}: could not download {weight.url} ({one_line(e)}); {hint}") from None
    return weight
