"""Heads: shapes for each spec, and the torchvision head's reuse of pretrained layers."""

import pytest
import torch
from torch import nn

from tlfinetune.errors import ConfigError
from tlfinetune.head import build_head, torchvision_head


@pytest.mark.parametrize(
    ("spec", "in_features"), [("flatten", 512 * 2 * 2), ("gap", 512), ("torchvision", 25088)]
)
def test_each_named_head_maps_the_feature_map_to_class_logits(spec, in_features):
    head = build_head(spec, (512, 2, 2), 5, hidden=8, dropout=0.0, backbone="vgg11")
    first = next(m for m in head.modules() if isinstance(m, nn.Linear))
    assert first.in_features == in_features
    assert head(torch.zeros(3, 512, 2, 2)).shape == (3, 5)


def test_a_factory_gets_the_flattened_size_and_the_class_count():
    seen = []

    def factory(in_features, num_classes):
        seen.append((in_features, num_classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))

    head = build_head(factory, (4, 3, 3), 2)
    assert seen == [(36, 2)] and head(torch.zeros(1, 4, 3, 3)).shape == (1, 2)


def test_unknown_head_names_the_choices():
    with pytest.raises(ConfigError, match="flatten, gap, torchvision"):
        build_head("dense", (4, 1, 1), 2)


def test_torchvision_head_keeps_pretrained_layers_and_replaces_the_last():
    classifier = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 10))
    pretrained = {
        "0.weight": torch.full((6, 4), 0.5),
        "0.bias": torch.full((6,), 0.25),
        "2.weight": torch.full((10, 6), 0.75),  # ImageNet's last layer: other classes
        "2.bias": torch.zeros(10),
    }
    head = torchvision_head(classifier, 3, pretrained)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert torch.equal(linears[0].weight, pretrained["0.weight"])
    assert torch.equal(linears[0].bias, pretrained["0.bias"])
    assert linears[-1].out_features == 3 and not torch.all(linears[-1].weight == 0.75)
