"""A steady-state training step reads no tensor value back to Python.

On a GPU every such read (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``torch.unique``,
...) waits for all queued kernels and leaves the GPU idle while Python prepares the next step;
two of them once cost tlfinetune half the plain loop's speed on an H200. The reads are the same
calls on the CPU, so a TorchFunctionMode that records them catches a new one here, without a GPU
(``benchmarks/gpu_sync_audit.py`` measures the real syncs on a device).
"""

import collections
import inspect
import traceback

import lightning.pytorch as pl
import numpy as np
import pytest
from tiny import tiny_tensors, trainer
from torch.overrides import TorchFunctionMode

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier

READS = {
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
    "nonzero", "unique", "masked_select", "equal", "allclose",
}  # fmt: skip
WARMUP = 2  # the first steps of an epoch build optimizer state and may read back once


class HostReads(TorchFunctionMode):
    """Counts calls that read a tensor's value back to the host, by the line that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            caller = traceback.extract_stack(limit=2)[0]  # the line that called it
            # torch.optim keeps Adam's step counter on the host by design (not a device read).
            if "torch/optim/" not in caller.filename:
                self.sites[f"{name} at {caller.filename}:{caller.lineno}"] += 1
        return func(*args, **(kwargs or {}))


class Watch(pl.Callback):
    """Records the host reads of each epoch's training steps after the warm-up."""

    def __init__(self) -> None:
        self.epochs: list[HostReads] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.epochs.append(HostReads().__enter__())
            self.steps.append(0)
        if batch_idx >= WARMUP:
            self.steps[-1] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Up to the end of the last step: epoch-end metrics and validation may read, once.
        if batch_idx == trainer.num_training_batches - 1 and batch_idx >= WARMUP:
            self.epochs[-1].__exit__(None, None, None)


def fit(regime: str, feature_cache: bool, epochs: int) -> Watch:
    x, y = tiny_tensors(n=48, size=32)
    images = x.permute(0, 2, 3, 1).numpy()
    labels = y.numpy()
    data = ImageDataModule.from_arrays(
        images, labels, images[:8], labels[:8], image_size=32, batch_size=8,
        num_workers=0, augment=False,
    )  # fmt: skip
    model = TransferClassifier(
        backbone="test_vgg16",
        weights="none",
        num_classes=3,
        image_size=32,
        feature_cache=feature_cache,
    )
    model.nonfinite_check_every = 50  # what an accelerator gets: no NaN read inside these steps
    watch = Watch()
    t = trainer(max_epochs=epochs, callbacks=[FreezeSchedule(regime=regime), watch])
    t.fit(model, data)
    assert np.all(np.array(watch.steps) == 48 // 8 - WARMUP)
    return watch


@pytest.mark.parametrize("regime", ["frozen", "partial", "full"])
def test_training_steps_read_nothing_back(regime):
    watch = fit(regime, feature_cache=False, epochs=1)
    assert dict(watch.epochs[0].sites) == {}


@pytest.mark.parametrize("regime", ["frozen", "partial"])
def test_steps_served_from_the_feature_cache_read_nothing_back(regime):
    watch = fit(regime, feature_cache=True, epochs=2)
    # Epoch 0 fills the cache, copying each batch's features to host memory (a read, once per
    # freeze phase); epoch 1 is served from the cache and must step like any other epoch.
    assert dict(watch.epochs[1].sites) == {}


def test_the_watch_sees_a_read():
    """The check itself: a step that calls ``.item()`` is caught, with its line."""

    class Chatty(TransferClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            print(f"loss {loss.item():.3f}")
            return loss

    x, y = tiny_tensors(n=32, size=32)
    data = ImageDataModule.from_arrays(
        x.permute(0, 2, 3, 1).numpy(), y.numpy(), image_size=32, batch_size=8, num_workers=0,
        augment=False, val_split=0.25,
    )  # fmt: skip
    model = Chatty(
        backbone="test_vgg16", weights="none", num_classes=3, image_size=32, feature_cache=False
    )
    model.nonfinite_check_every = 50
    watch = Watch()
    trainer(max_epochs=1, callbacks=[FreezeSchedule(regime="frozen"), watch]).fit(model, data)
    line = inspect.getsourcelines(Chatty.training_step)[1] + 2
    assert dict(watch.epochs[0].sites) == {f"item at {__file__}:{line}": watch.steps[0]}
