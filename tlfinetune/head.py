"""Heads: what sits on the backbone's feature map and turns it into class logits.

Softmax is not part of any head: it lives in the loss (cross-entropy on logits) and in predict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn

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


def torchvision_head(classifier: nn.Sequential, num_classes: int) -> nn.Sequential:
    """Torchvision's VGG classifier (7x7 pooling, fc6, fc7) with a new last layer."""
    last = classifier[-1]
    classifier[-1] = nn.Linear(last.in_features, num_classes)
    return nn.Sequential(nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), *classifier)
