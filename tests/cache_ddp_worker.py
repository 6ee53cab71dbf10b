"""The feature-cache run of test_cache_ddp.py, launched by ddp_worker.py: 2-process DDP (gloo).

Fits the same model twice, with and without the feature cache, from a frozen backbone that a
milestone partly unfreezes (two freeze phases), and saves each rank's results.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
from tiny import tiny_tensors
from tiny import trainer as tiny_trainer

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache


class Record(pl.Callback):
    """Per epoch: whether the cache served it, and the positions each training batch held."""

    def __init__(self) -> None:
        self.active: list[bool] = []
        self.labels: list[list[int]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.labels.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels[-1].extend(batch[1].tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        cache = FeatureCache.find(trainer)
        self.active.append(bool(cache and cache.active))


def fit(cache: bool) -> dict:
    # 21 training and 7 validation images: DistributedSampler pads each with a repeat.
    x, y = tiny_tensors(n=28, size=32, seed=1)
    images = x.permute(0, 2, 3, 1).contiguous()
    data = ImageDataModule.from_arrays(
        images[:21], y[:21], images[21:], y[21:], image_size=32, batch_size=4,
        augment=False, num_workers=0, seed=3,
    )  # fmt: skip
    pl.seed_everything(0)
    model = TransferClassifier(backbone="test_vgg16", weights="none", feature_cache=cache)
    record = Record()
    trainer = tiny_trainer(
        4,
        devices=2,
        strategy="ddp",
        callbacks=[
            FreezeSchedule(regime="frozen", milestones={2: "block5"}, backbone_lr_ratio=0.5),
            record,
        ],
    )
    trainer.fit(model, data)
    store = FeatureCache.find(trainer)
    return {
        "state": model.state_dict(),
        "metrics": {k: v.item() for k, v in trainer.callback_metrics.items()},
        "builds": store.builds if store else 0,
        "active": record.active,
        "labels": record.labels,
        "rank": trainer.global_rank,
    }


def run(out: Path) -> None:
    """Both fits; each rank's results to OUT/rank<i>.pt."""
    cached, plain = fit(True), fit(False)
    torch.save({"cached": cached, "plain": plain}, out / f"rank{cached['rank']}.pt")
