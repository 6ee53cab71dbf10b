"""The feature cache at scale: training precision, disk space, nothing left behind."""

import logging
import re
import shutil
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tiny import tiny_tensors, trainer

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache


def data():
    x, y = tiny_tensors(n=24, size=32, seed=2)
    images = x.permute(0, 2, 3, 1).contiguous()
    return ImageDataModule.from_arrays(
        images[:16], y[:16], images[16:], y[16:], image_size=32, batch_size=8,
        augment=False, num_workers=0, seed=1,
    )  # fmt: skip


def fit(cache, epochs=2, store=None, callbacks=(), **kwargs):
    torch.manual_seed(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none", feature_cache=cache)
    store = store or FeatureCache()
    t = trainer(epochs, callbacks=[FreezeSchedule(), store, *callbacks], **kwargs)
    t.fit(model, data())
    return model, store


class Features(pl.Callback):
    """The cache's training features as the last epoch ends (they are freed with the fit)."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.train = FeatureCache.find(trainer).features("train")


def test_features_are_stored_in_the_training_precision():
    seen = Features()
    cached, store = fit(True, precision="bf16-mixed", callbacks=[seen])
    plain, _ = fit(False, precision="bf16-mixed")
    assert store.builds == 2
    features = seen.train
    assert features.dtype == torch.bfloat16  # half the bytes of fp32, what the head is fed
    # The cache holds exactly what the frozen backbone gives under bf16 autocast.
    dm = data()
    dm.setup("fit")
    images = torch.stack([dm.train_dataset[i][0] for i in range(len(dm.train_dataset))])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = cached.backbone(cached.normalize(images))
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_no_room_on_disk_trains_through_the_images_and_says_so(tmp_path, monkeypatch, caplog):
    free = 100  # bytes: less than 16 images' features
    usage = shutil.disk_usage(tmp_path)._replace(free=free)
    monkeypatch.setattr("tlfinetune.cache.shutil.disk_usage", lambda path: usage)
    store = FeatureCache(memory_mb=0, directory=str(tmp_path / "features"))
    with caplog.at_level(logging.WARNING, logger="tlfinetune.cache"):
        cached, store = fit(True, epochs=3, store=store)
    plain, _ = fit(False, epochs=3)
    assert store.builds == 0 and not store.active
    warnings = [r.getMessage() for r in caplog.records if "off for this phase" in r.getMessage()]
    assert len(warnings) == 2  # train and val, once each, not again every epoch
    assert str((tmp_path / "features").resolve()) in warnings[0]
    assert re.search(r"need \d+\.\d KiB on disk", warnings[0]) and "100 bytes free" in warnings[0]
    assert "directory=" in warnings[0]
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_big_features_fit_on_a_disk_with_room(tmp_path):
    store = FeatureCache(memory_mb=0, directory=str(tmp_path / "features"))
    _, store = fit(True, epochs=3, store=store)
    assert store.builds == 2


class Boom(pl.Callback):
    """Raises in the second epoch, once the cache holds features; notes the folder then."""

    def __init__(self, folder: Path, exception: BaseException) -> None:
        self.folder, self.exception, self.during = folder, exception, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            self.during = sorted(p.name for p in self.folder.rglob("*"))
            raise self.exception


@pytest.mark.parametrize("exception", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("unlink", ["works", "refused"])
def test_cache_files_are_removed_when_the_fit_fails(tmp_path, monkeypatch, exception, unlink):
    folder = tmp_path / "features"
    if unlink == "refused":  # as Windows refuses for a mapped file: teardown must remove it
        monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(OSError))
    store = FeatureCache(memory_mb=0, directory=str(folder))
    boom = Boom(folder, exception)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((RuntimeError, SystemExit)):  # Lightning exits 1 on Ctrl-C
            fit(True, epochs=3, store=store, callbacks=[boom])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C after catching one
    assert store.builds == 2 and boom.during is not None
    if unlink == "works":
        assert boom.during == []  # unlinked once mapped: nothing to leave behind, even on kill
    else:
        assert len([name for name in boom.during if name.endswith(".bin")]) == 2  # train, val
    assert list(folder.iterdir()) == []
