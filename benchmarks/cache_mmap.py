"""Feature cache from a memory-mapped file that is not in the page cache: per-epoch times.

``python benchmarks/cache_mmap.py plain|memory|disk-cold partial OUT.json`` (Linux, util-linux
``fincore`` for the check) trains 192 random images at 96 px in bf16 for 3 epochs.

disk-cold: features go to a memory-mapped file (memory_mb=0), and before every epoch the file's
pages are written back and evicted from the page cache (posix_fadvise DONTNEED), so each cached
epoch reads every feature row from the disk, as with a cache larger than the page cache.
"""

import ctypes
import json
import os
import pathlib
import subprocess
import sys
import time

import lightning.pytorch as pl
import torch

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache

mode, regime, out = sys.argv[1:4]
folder = pathlib.Path("cache_mmap_features")  # under the current folder: a real disk
if mode == "disk-cold":  # keep the file visible so it can be evicted
    real = pathlib.Path.unlink

    def unlink(self, *a, **k):
        if self.suffix == ".bin":
            raise OSError("kept for the benchmark")
        return real(self, *a, **k)

    pathlib.Path.unlink = unlink


libc = ctypes.CDLL("libc.so.6", use_errno=True)


def unmap_pages(t):
    # drop this process's page-table entries for the mapped features, so the page cache
    # may evict them (fadvise skips pages mapped by a process)
    if t is None:
        return
    page = 4096
    start = t.data_ptr() // page * page
    end = t.data_ptr() + t.numel() * t.element_size()
    rc = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)
    assert rc == 0, ctypes.get_errno()


def evict(trainer=None):
    c = FeatureCache.find(trainer) if trainer is not None else None
    if c is not None:
        unmap_pages(c.features("train"))
    n = 0
    for f in folder.rglob("*.bin"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        n += f.stat().st_size

        res.append(
            subprocess.run(
                ["fincore", "--bytes", "--noheadings", "-o", "RES", str(f)],
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    return n


res = []


class Clock(pl.Callback):
    def __init__(self):
        self.times, self.active, self.evicted = [], [], []

    def on_train_epoch_start(self, t, m):
        if mode == "disk-cold":
            self.evicted.append(evict(t))
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, t, m):
        self.times.append(time.perf_counter() - self.t0)
        c = FeatureCache.find(t)
        self.active.append(bool(c and c.active))


g = torch.Generator().manual_seed(0)
n, size = 192, 96
x = torch.randint(0, 255, (n, size, size, 3), generator=g, dtype=torch.uint8)
y = torch.arange(n) % 4
dm = ImageDataModule.from_arrays(
    x, y, x[:16], y[:16], image_size=size, batch_size=32, augment=False, num_workers=0, seed=0
)
pl.seed_everything(0)
model = TransferClassifier(weights="none", feature_cache=(mode != "plain"))
clock = Clock()
cache = FeatureCache(memory_mb=0 if mode == "disk-cold" else 4096, directory=str(folder))
t = pl.Trainer(
    accelerator="cpu",
    max_epochs=3,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
    precision="bf16-mixed",
    callbacks=[FreezeSchedule(regime=regime, unfreeze_from="block5"), cache, clock],
)
t.fit(model, dm)
result = {
    "times": clock.times,
    "active": clock.active,
    "evicted": clock.evicted,
    "resident_after_evict": res,
}
pathlib.Path(out).write_text(json.dumps(result))
