"""The backbone's output shape is found on the meta device, as the real probe would find it."""

import pytest
import torch
from torch import nn

from tlfinetune import backbone as bb
from tlfinetune.errors import ConfigError


class _ReadsValues(nn.Module):
    """A layer whose output size depends on a value: it cannot run on the meta device."""

    def forward(self, x):
        return x[:, : int(x.new_ones(()).item()) + 1]


def test_probe_shape_matches_the_probe_and_leaves_modes_alone():
    net = bb.build_backbone("test_vgg16")
    net.train()
    net[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in net.modules()]
    for size in (32, 64):
        assert bb.probe_shape(net, size) == bb.probe(net, size).shape
    assert [m.training for m in net.modules()] == modes
    assert all(p.device.type == "cpu" for p in net.parameters())  # weights stay where they were
    assert bb.feature_shape(net, "test_vgg16", 64) == tuple(bb.probe(net, 64).shape[1:])


def test_a_module_that_cannot_run_on_meta_is_probed_for_real():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), _ReadsValues())
    assert bb.probe_shape(net, 32) == torch.Size([1, 2, 15, 15])


def test_an_image_size_too_small_for_the_backbone_says_the_smallest_that_works():
    """VGG's five max-pools need 32 px; 16 px used to end in PyTorch's pooling RuntimeError."""
    net = bb.build_backbone("test_vgg16")
    assert bb.smallest_image_size(net) == 32
    for size in (1, 16, 31):
        with pytest.raises(ConfigError, match=f"image_size {size} is too small for the backbone "
                           "test_vgg16.* at least 32; set --data.image_size"):  # fmt: skip
            bb.feature_shape(net, "test_vgg16", size)
    assert bb.feature_shape(net, "test_vgg16", 32) == (32, 1, 1)


def test_a_failure_that_no_image_size_cures_is_not_called_a_size_problem():
    net = nn.Sequential(nn.Flatten(), nn.Linear(5, 2))  # takes no image of any size
    assert bb.smallest_image_size(net) is None
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bb.feature_shape(net, "odd", 32)
