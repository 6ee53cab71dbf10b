"""Heads: what sits on the backbone's feature map and turns it into class logits.

Softmax is not part of any head: it lives in the loss (cross-entropy on logits) and in predict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn

from tlfinetune.backbone import build_classifier, get_spec
from tlfinetune.errors import ConfigError

HeadName = Literal["flatten", "gap", "torchvision"]
# A head given by ``class_path`` in a config: called as factory(in_features, num_classes), where
# in_features is the size of the flattened feature map (C*H*W).
HeadFactory = Callable[[int, int], nn.Module]


def flatten_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.0):
    """The seed's head: Keras ``Flatten -> Dense(256, relu) -> Dense(num_classes, softmax)``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def gap_head(channels: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Global average pooling + linear: tiny, and independent of the image size."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels, num_classes),
    )


def torchvision_head(
    classifier: nn.Sequential,
    num_classes: int,
    pretrained: Mapping[str, torch.Tensor] | None = None,
) -> nn.Sequential:
    """Torchvision's VGG classifier (7x7 pooling, fc6, fc7) with a new last layer.

    ``pretrained`` (the classifier's tensors from the same weights file) fills every layer but
    the last, which is new: it has ``num_classes`` outputs instead of ImageNet's 1000.
    """
    if pretrained:
        last = f"{len(classifier) - 1}."
        keep = {k: v for k, v in pretrained.items() if not k.startswith(last)}
        classifier.load_state_dict(keep, strict=False)
    classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
    return nn.Sequential(nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), *classifier)


def family_head(
    backbone: str, num_classes: int, pretrained: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """The ``torchvision`` head of ``backbone``, with a new last layer of ``num_classes`` outputs.

    It is what the torchvision model runs after the backbone: pooling, flatten, classifier.

    ``pretrained`` (the tensors outside the backbone from the same weights file, keyed as in
    the torchvision model) fills every layer but the last: VGG's fc6 and fc7, ConvNeXt's
    LayerNorm, MobileNetV3's first linear layer.
    """
    spec = get_spec(backbone)
    pretrained = dict(pretrained or {})
    if spec.family is None:  # VGG: AdaptiveAvgPool2d((7, 7)) and the classifier Sequential
        classifier = {k[11:]: v for k, v in pretrained.items() if k.startswith("classifier.")}
        return torchvision_head(build_classifier(backbone), num_classes, classifier)
    model = spec.model(weights=None)
    last = spec.family.last + "."
    keep = {k: v for k, v in pretrained.items() if not k.startswith(last)}
    model.load_state_dict(keep, strict=False)  # keep holds exactly the model's non-backbone keys
    *parts, old = spec.family.head(model)
    return nn.Sequential(*parts, nn.Linear(old.in_features, num_classes))


def build_head(
    spec: HeadName | HeadFactory,
    feature_shape: tuple[int, int, int],
    num_classes: int,
    *,
    hidden: int = 256,
    dropout: float = 0.0,
    backbone: str = "vgg16",
    pretrained_classifier: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The head ``spec`` names, for a backbone feature map of ``feature_shape`` ``(C, H, W)``.

    Args:
        spec: ``flatten``, ``gap``, ``torchvision`` (:func:`family_head`) or a factory
            ``(C*H*W, num_classes)``.
        feature_shape: The backbone's feature map of one image, ``(C, H, W)``.
        num_classes: Outputs of the head.
        hidden: Width of the ``flatten`` head's hidden layer.
        dropout: Dropout before the head's last layer (``flatten`` and ``gap``).
        backbone: The backbone's name, whose own classifier the ``torchvision`` head reuses.
        pretrained_classifier: That classifier's pretrained tensors, if the weights had them.
    """
    c, h, w = feature_shape
    if spec == "flatten":
        return flatten_head(c * h * w, num_classes, hidden, dropout)
    if spec == "gap":
        return gap_head(c, num_classes, dropout)
    if spec == "torchvision":
        return family_head(backbone, num_classes, pretrained_classifier)
    if callable(spec):
        return spec(c * h * w, num_classes)
    raise ConfigError(f"head={spec!r} is not one of: flatten, gap, torchvision, or a class_path.")
