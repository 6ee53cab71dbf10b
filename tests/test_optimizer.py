"""The optimizer the module builds: trainable parameters only, torch's fused kernel by default."""

from functools import partial

import pytest
import torch

from tlfinetune import TransferClassifier
from tlfinetune.module import _fused_when_unchosen


def model(**kwargs):
    return TransferClassifier(
        backbone="test_vgg16", num_classes=3, weights="none", image_size=32, **kwargs
    )


def test_default_adam_uses_the_fused_kernel_and_keeps_the_groups():
    optimizer = model().configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["fused"] is True
    # Outside a Trainer nothing froze the backbone: both groups, as configure_optimizers made them.
    assert [g["name"] for g in optimizer.param_groups] == ["head", "backbone"]
    assert all(g["fused"] is True for g in optimizer.param_groups)


@pytest.mark.parametrize("choice", [{"foreach": True}, {"fused": False}, {"foreach": False}])
def test_an_implementation_the_user_chose_is_kept(choice):
    optimizer = model(optimizer=partial(torch.optim.Adam, lr=0.01, **choice)).configure_optimizers()
    for key, value in choice.items():
        assert optimizer.defaults[key] is value
    assert optimizer.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(
    "make", [partial(torch.optim.Adam, lr=0.01), partial(torch.optim.AdamW, weight_decay=0.1)]
)
def test_fused_steps_equal_the_default_steps(make):
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    results = []
    for build in (make, lambda p: _fused_when_unchosen(make(p))):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = build([{"params": params, "name": "head", "lr": 0.02}])
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        assert (
            optimizer.param_groups[0]["lr"] == 0.02 and optimizer.param_groups[0]["name"] == "head"
        )
        results.append([p.detach() for p in params])
    assert results[1][0] is not results[0][0]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(a, start[0] if a.shape == start[0].shape else start[1])
