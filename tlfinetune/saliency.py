"""Grad-CAM heat maps: where in an image the model found the evidence for a class.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional feature map by the mean
gradient of the class score with respect to it, sums the channels and keeps the positive part:
a coarse map of the regions that raised the score. The computation is captum's
``LayerGradCam``; this module chooses the layer, runs it without touching the model's state, and
draws the overlays that ``mistakes.png`` and ``predict --prediction.explain`` show.

The layer is the output of the backbone's last convolutional stage (:func:`cam_layer`): for VGG
the last ReLU of block5, before its pooling, so a 224 px image gives a 14 x 14 map. Gradients are
taken with respect to that layer's activations, never the parameters, so the map is the same for
a frozen backbone; the model's ``requires_grad`` flags, train/eval mode and weights are left as
they were, and no parameter receives a ``.grad``.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from torch import Tensor, nn

from tlfinetune.errors import ConfigError

__all__ = ["cam_layer", "grad_cam", "overlay"]

log = logging.getLogger(__name__)

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def cam_layer(model: nn.Module) -> nn.Module:
    """The module of ``model.backbone`` whose output Grad-CAM explains.

    A backbone table entry may name it (a ``cam_layer`` index into the backbone); otherwise a dry
    run at the model's image size finds the last direct child of the backbone whose output is an
    ``(N, C, H, W)`` map, passing over pooling layers (they only coarsen the map), after which
    nothing with parameters runs. Backbones that end in tokens (ViT) or in channels-last maps have
    no such layer and get a :class:`ConfigError` (Swin is fine: its last unit turns its maps
    back to NCHW).

    Args:
        model: a :class:`~tlfinetune.module.TransferClassifier` (anything with ``backbone``,
            ``head`` and ``normalize``).
    """
    backbone = getattr(model, "backbone", None)
    name = getattr(model, "hparams", {}).get("backbone", type(backbone).__name__)
    if not isinstance(backbone, nn.Sequential) or getattr(model, "head", None) is None:
        raise ConfigError(
            "Grad-CAM needs a TransferClassifier (a backbone and a head) to find the layer to "
            f"explain; got {type(model).__name__}."
        )
    index = _table_cam_layer(name)
    if index is None:
        key = (_image_size(model), name)
        found = _found.get(backbone)
        if found is None or found[0] != key:  # one dry run per backbone, not one per batch
            found = _found[backbone] = (key, _find_cam_layer(backbone, key[0], name))
        index = found[1]
    return backbone[index]


_found: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, str], int]] = (
    weakref.WeakKeyDictionary()
)


def _table_cam_layer(name: str) -> int | None:
    """The ``cam_layer`` fact of the backbone table entry, when the entry states one."""
    from tlfinetune.backbone import BACKBONES

    return getattr(BACKBONES.get(name), "cam_layer", None)


def _image_size(model: nn.Module) -> int:
    size = getattr(model, "hparams", {}).get("image_size")
    return int(size) if size else 224


def _find_cam_layer(backbone: nn.Sequential, size: int, name: str) -> int:
    """Index of the last child with an NCHW map output and only parameter-free children after."""
    outputs: list[Any] = []
    hooks = [m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in backbone]
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad(), _eval(backbone):
            backbone(torch.zeros(1, 3, size, size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    # A square image gives a square NCHW map; a channels-last (N, H, W, C) map is square in the
    # middle two dimensions only, and token sequences (N, L, C) have three.
    is_map = [isinstance(o, Tensor) and o.ndim == 4 and o.shape[2] == o.shape[3] for o in outputs]
    tokens = any(not isinstance(o, Tensor) or o.ndim == 3 for o in outputs)
    candidates = [
        i for i, m in enumerate(backbone) if is_map[i] and not isinstance(m, _POOLING)
    ]  # fmt: skip
    if candidates and not tokens:
        last = candidates[-1]
        if not any(p.numel() for m in backbone[last + 1 :] for p in m.parameters()):
            return last
    raise ConfigError(
        f"Grad-CAM is not supported for the backbone {name}: it has no convolutional feature "
        "map (N, C, H, W) at its end (token-based backbones such as ViT, or ones ending in "
        "channels-last maps, need another method). Use a convolutional backbone (VGG, ResNet, "
        "EfficientNet, ConvNeXt, Swin) to get heat maps, or leave --prediction.explain out."
    )


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, each module's own mode restored after (frozen BatchNorm stays eval)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def grad_cam(model: nn.Module, images: Tensor, target: Tensor | None = None) -> Tensor:
    """Grad-CAM maps of ``images`` for the ``target`` classes, upsampled to the image size.

    Runs in eval mode with gradients on, also inside ``torch.no_grad`` or
    ``torch.inference_mode`` (as in Lightning's evaluation and prediction loops); the model's
    modes, ``requires_grad`` flags and weights are as before afterwards.

    Args:
        model: a :class:`~tlfinetune.module.TransferClassifier`.
        images: ``(N, 3, H, W)`` uint8, or float in ``[0, 1]``; moved to the model's device.
        target: class per image ``(N,)``; by default the predicted class.

    Returns:
        ``(N, H, W)`` float maps on the CPU, each scaled to ``[0, 1]`` (all zeros where no
        position raised the class score).
    """
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise ConfigError(
            "Grad-CAM heat maps need the captum package: pip install 'tlfinetune[saliency]'."
        ) from None
    layer = cam_layer(model)
    param = next(model.parameters())
    height, width = images.shape[-2:]
    with torch.inference_mode(False), torch.enable_grad(), _eval(model):
        # A clone made outside inference mode: inference tensors cannot enter autograd.
        x = images.detach().to(param.device).clone()
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()

        # Not model.forward: it runs the frozen prefix under no_grad, which would cut the graph
        # between the explained layer and the class score.
        def score(inputs: Tensor) -> Tensor:
            return model.head(model.backbone(model.normalize(inputs))).float()

        if target is None:
            with torch.no_grad():
                target = score(x).argmax(dim=1)
        target = target.detach().to(param.device).long().clone()  # not an inference tensor
        cam = LayerGradCam(score, layer).attribute(x, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.float(), (height, width), "bilinear")
    cam = cam.detach().squeeze(1).clamp_min(0).cpu()  # bilinear keeps it >= 0; rounding
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return cam / peak[:, None, None]


def overlay(image: Tensor, heat: Tensor, alpha: float = 0.45) -> Tensor:
    """The image with the heat map blended over it in the ``jet`` colours (red: most evidence).

    Args:
        image: ``(3, H, W)`` uint8 (or ``(1, H, W)`` grayscale).
        heat: ``(H, W)`` in ``[0, 1]``.
        alpha: weight of the heat map's colour.

    Returns:
        ``(3, H, W)`` uint8.
    """
    rgb = image.expand(3, -1, -1).permute(1, 2, 0).float().numpy() / 255
    colours = colormaps["jet"](heat.clamp(0, 1).numpy())[..., :3]
    blended = (1 - alpha) * rgb + alpha * colours
    return torch.from_numpy(np.round(blended * 255).astype(np.uint8)).permute(2, 0, 1)
