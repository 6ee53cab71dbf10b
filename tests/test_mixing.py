"""Mixup/CutMix: soft labels, seeded per (seed, epoch, batch), the feature cache off, a fit runs."""

import lightning.pytorch as pl
import pytest
import torch
from tiny import tiny_tensors, trainer

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache
from tlfinetune.errors import DataError
from tlfinetune.mixing import BatchMix
from tlfinetune.runs import AtomicCheckpointIO, RunCheckpoint

# Tiny models: a second thread only adds overhead (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "mixup_cutmix"])
def test_mixed_labels_are_soft_rows_that_sum_to_one(mode):
    images, labels = tiny_tensors(8, 32)
    mix = BatchMix(mode, num_classes=3, seed=5)
    rng = torch.get_rng_state()
    x, y = mix(images, labels, epoch=2, batch_idx=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the global stream is left as it was
    assert x.dtype == torch.float32 and x.shape == images.shape and 0 <= x.min() <= x.max() <= 1
    assert y.shape == (8, 3) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(dim=1), torch.ones(8))
    assert ((y > 0) & (y < 1)).any(), "no label was blended"
    # Each row blends the image's own label and its neighbour's (torchvision pairs by roll).
    own = y.gather(1, labels[:, None]).squeeze(1)
    neighbour = y.gather(1, labels.roll(1)[:, None]).squeeze(1)
    torch.testing.assert_close(own + neighbour * (labels != labels.roll(1)), torch.ones(8))
    # (seed, epoch, batch) decides the draw, nothing else.
    again = mix(images, labels, epoch=2, batch_idx=1)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    other = mix(images, labels, epoch=2, batch_idx=2)
    assert not torch.equal(other[1], y)


def test_soft_targets_give_the_loss_of_the_hard_ones():
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    torch.testing.assert_close(model.loss(logits, one_hot), model.loss(logits, labels))


def test_bad_alpha_is_refused():
    with pytest.raises(DataError, match="data.cutmix_alpha must be a positive number, got 0"):
        ImageDataModule(root="x", mix="cutmix", cutmix_alpha=0)


class Batches(pl.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train.append((trainer.current_epoch, batch_idx, batch[0].clone(), batch[1].clone()))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch[1].clone())


def test_a_fit_trains_on_mixed_batches_with_the_cache_off(tmp_path, data_log):
    images, labels = tiny_tensors(16, 32)
    dm = ImageDataModule.from_arrays(
        images.permute(0, 2, 3, 1), labels, images[:6].permute(0, 2, 3, 1), labels[:6],
        image_size=32, batch_size=4, num_workers=0, augment=False, mix="mixup_cutmix", seed=3,
    )  # fmt: skip
    model = TransferClassifier(backbone="test_vgg16", weights="none")
    seen = Batches()
    t = trainer(max_epochs=2, callbacks=[seen], default_root_dir=tmp_path)
    t.fit(model, dm)

    assert "Feature cache off: training batches are mixed (data.mix: mixup_cutmix)" in data_log.text
    assert FeatureCache.find(t).builds == 0
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert len(seen.train) == 8 and all(v.dtype == torch.long for v in seen.val)  # val: as is
    # Every training batch is the mix of its images drawn from (seed, epoch, batch index), the
    # index within the epoch that a resumed run also counts from.
    mix = BatchMix("mixup_cutmix", num_classes=3, seed=3)
    for epoch, batch_idx, x, y in seen.train:
        order = dm.train_sampler.permutation(epoch)[batch_idx * 4 : batch_idx * 4 + 4]
        plain = torch.stack([dm.train_dataset[i][0] for i in order])
        hard = torch.tensor([dm.train_dataset[i][1] for i in order])
        expected = mix(plain, hard, epoch, batch_idx)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
        torch.testing.assert_close(y.sum(dim=1), torch.ones(4))


class StopAt(pl.Callback):
    """Ctrl-C right after the checkpoint of global step ``step``, before the next batch trains."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def mixed_fit(folder, *callbacks, ckpt=None):
    pl.seed_everything(7)
    images, labels = tiny_tensors(20, 32)
    dm = ImageDataModule.from_arrays(
        images[:16].permute(0, 2, 3, 1), labels[:16], images[16:].permute(0, 2, 3, 1), labels[16:],
        image_size=32, batch_size=4, num_workers=0, augment=False, mix="mixup_cutmix", seed=3,
    )  # fmt: skip
    model = TransferClassifier(backbone="test_vgg16", weights="none", head_dropout=0.3)
    t = trainer(
        max_epochs=2, default_root_dir=folder, deterministic=True, enable_checkpointing=True,
        callbacks=[RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=6),
                   FreezeSchedule(regime="full"), *callbacks],
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    t.fit(model, dm, ckpt_path=ckpt)
    return model


@pytest.mark.slow
def test_a_mixed_run_resumed_mid_epoch_ends_as_an_uninterrupted_one(tmp_path):
    whole = mixed_fit(tmp_path / "whole")
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C
        mixed_fit(tmp_path / "stopped", StopAt(6))  # epoch 1, after 2 of its 4 batches
    resumed = mixed_fit(tmp_path / "stopped", ckpt=tmp_path / "stopped" / "last.ckpt")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
