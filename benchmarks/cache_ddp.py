"""Feature cache under DDP: per-epoch training times, cached or not, 1 or 2 CPU processes.

``python benchmarks/cache_ddp.py cached|plain 1|2 frozen|partial OUT.json`` writes rank 0's
epoch times (384 random images at 64 px, 4 epochs; epoch 0 fills the cache). Run the modes
interleaved and compare later epochs; README.md quotes the ratios.
"""

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache


class Clock(pl.Callback):
    def __init__(self):
        self.times, self.active = [], []

    def on_train_epoch_start(self, t, m):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, t, m):
        self.times.append(time.perf_counter() - self.t0)
        c = FeatureCache.find(t)
        self.active.append(bool(c and c.active))


mode, devices, regime, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
g = torch.Generator().manual_seed(0)
n, size = 384, 64
x = torch.randint(0, 255, (n, size, size, 3), generator=g, dtype=torch.uint8)
y = torch.arange(n) % 4
dm = ImageDataModule.from_arrays(
    x, y, x[:32], y[:32], image_size=size, batch_size=32, augment=False, num_workers=0, seed=0
)
pl.seed_everything(0)
model = TransferClassifier(weights="none", feature_cache=(mode == "cached"))
clock = Clock()
kw = dict(strategy="ddp", devices=2) if devices == 2 else dict(devices=1)
t = pl.Trainer(
    accelerator="cpu",
    max_epochs=4,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
    callbacks=[FreezeSchedule(regime=regime, unfreeze_from="block5"), clock],
    **kw,
)
t.fit(model, dm)
if t.global_rank == 0:
    result = {"times": clock.times, "active": clock.active, "threads": torch.get_num_threads()}
    Path(out).write_text(json.dumps(result))
