"""The backbone's output shape is found on the meta device, as the real probe would find it."""

import torch
from torch import nn

from tlfinetune import backbone as bb


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
