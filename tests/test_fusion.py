"""fusion.run: the frozen layers' forward with oneDNN's conv+ReLU kernels, exactly layers(x)."""

import pytest
import torch
from tiny import TinyData, trainer

from tlfinetune import fusion
from tlfinetune.backbone import build_backbone
from tlfinetune.module import TransferClassifier

FUSED = "mkldnn::_convolution_pointwise"


def ops(fn):
    """The operator names ``fn()`` runs, and its result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return {e.name for e in prof.events()}, out


def autocast(precision):
    enabled = precision == "bf16-mixed"
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_forward_is_bit_identical_to_the_modules(precision, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layers = build_backbone("test_vgg16").eval().to(memory_format=fmt)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad(), autocast(precision):
        expected = layers(x)
        names, got = ops(lambda: fusion.run(layers, x))
    assert FUSED in names  # the 13 convolutions ran fused ...
    assert "aten::relu_" not in names and "aten::relu" not in names  # ... with their ReLUs
    assert got.dtype == expected.dtype
    assert got.is_contiguous(memory_format=fmt)
    assert torch.equal(got, expected)


def test_graphs_hooks_and_other_dtypes_take_the_modules_path():
    layers = build_backbone("test_vgg16").eval()
    x = torch.randn(2, 3, 32, 32)
    # A graph is being recorded: the standard operators, so backward works.
    names, out = ops(lambda: fusion.run(layers, x.requires_grad_()))
    assert FUSED not in names and out.requires_grad
    x = x.detach()
    with torch.no_grad():
        # fp16 autocast and float64 are not proven exact: the modules as they are.
        with torch.autocast("cpu", dtype=torch.float16):
            assert FUSED not in ops(lambda: fusion.run(layers, x))[0]
        assert FUSED not in ops(lambda: fusion.run(layers.double(), x.double()))[0]
        layers.float()
        with torch.backends.mkldnn.flags(enabled=False):  # PyTorch's switch turns it off
            assert FUSED not in ops(lambda: fusion.run(layers, x))[0]
        # A forward hook (the feature cache's capture) fires on its module, others still fuse.
        seen = []
        handle = layers[1].register_forward_hook(lambda m, i, out: seen.append(out.clone()))
        names, out = ops(lambda: fusion.run(layers, x))
        handle.remove()
        assert FUSED in names and "aten::relu_" in names
        assert len(seen) == 1 and torch.equal(seen[0], layers[:2](x))
        assert torch.equal(out, layers(x))


def test_a_frozen_training_step_fuses_the_prefix_and_trains_the_head():
    torch.manual_seed(0)
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=3, image_size=32, feature_cache=False
    )
    data = TinyData(n=8, batch_size=4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = [p.clone() for p in model.head.parameters()]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer(max_epochs=1, limit_val_batches=0).fit(model, data)
    names = {e.name for e in prof.events()}
    assert FUSED in names
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(head, model.head.parameters(), strict=True))
    # The fused features are those of the modules themselves.
    model.eval()
    x = data.x[:4]
    with torch.no_grad():
        assert torch.equal(model.features(model.normalize(x)), model.backbone(model.normalize(x)))
