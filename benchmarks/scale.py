"""Dataset scale: what a folder of N images costs before and during training.

Generates N JPEGs of mixed sizes into class folders (a process pool: 100,000 at 64 px take a
minute or two here), then measures in this process:

- the header scan: files/s on the first run and on a second run that finds the scan record;
- the datamodule's bookkeeping per image (file list, labels, scan results: ``tracemalloc``);
- time to the first training step of ``trainer.fit`` (indexing, scan, model, loaders);
- with ``--epochs``: images/s of every epoch (later ones from the feature cache), the cache's
  size and where it lives (``--cache_memory_mb`` below the cache's size puts it in a
  memory-mapped file); peak RSS;
- with ``--predict``: ``python -m tlfinetune predict`` over the whole folder from the trained
  checkpoint, in a fresh process: images/s (process start included) and its own peak RSS.

Example::

    python benchmarks/scale.py --images 100000 --image_size 64 --epochs 0
    python benchmarks/scale.py --images 10000 --image_size 64 --epochs 3 --predict true
"""

from __future__ import annotations

import gc
import os
import shutil
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from bench_measure import EpochTimer
from jsonargparse import CLI
from memory import run as run_measured
from PIL import Image

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache
from tlfinetune.machine import fastest_precision, peak_rss_mb
from tlfinetune.scan import RECORD_NAME

CLASSES = 10


def _write_chunk(args: tuple[str, int, int, int]) -> None:
    root, start, stop, side = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        w, h = (int(side * f) for f in rng.uniform(0.75, 1.5, size=2))
        pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((w, h))  # smooth: JPEG sizes of real photos
        folder = Path(root) / f"class{i % CLASSES}"
        image.save(folder / f"{i:07d}.jpg", quality=85)


def generate(root: Path, n: int, side: int) -> float:
    """Write ``n`` JPEGs into ``root/class*/``; seconds taken."""
    t = time.perf_counter()
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    chunks = [(str(root), s, min(n, s + 2000), side) for s in range(0, n, 2000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_chunk, chunks))
    return time.perf_counter() - t


class FirstStep(pl.Callback):
    """Seconds from ``start`` to the first training step."""

    def __init__(self, start: float) -> None:
        self.start, self.seconds = start, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start


class CacheSize(pl.Callback):
    """Size (MB) and dtype of the training features the cache holds after the first epoch."""

    def __init__(self) -> None:
        self.mb, self.dtype = None, None

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        features = FeatureCache.find(trainer).features("train")
        if self.mb is None and features is not None:
            self.mb = round(features.numel() * features.element_size() / 2**20, 1)
            self.dtype = str(features.dtype)


def bookkeeping_bytes(root: Path, image_size: int) -> float:
    """Bytes a set-up datamodule keeps per image (its scan record present: the second run).

    Traced twice, the second counted: the first setup in a process also allocates state kept
    once per process, not per image (measured at 20,000 images: 531 B/image, then 146).
    """
    for _ in range(2):
        gc.collect()
        tracemalloc.start()
        try:
            dm = ImageDataModule(root=root, image_size=image_size, augment=False)
            dm.setup("fit")
            gc.collect()
            kept, _ = tracemalloc.get_traced_memory()
            n = len(dm.train_dataset) + len(dm.val_dataset)
        finally:
            tracemalloc.stop()
        del dm
    return kept / n


def scale(
    images: int = 10_000,
    image_size: int = 64,
    epochs: int = 0,
    cache_memory_mb: int = 2048,
    predict: bool = False,
    precision: str | None = None,
    folder: str = "/tmp/tlfinetune-scale",
    keep: bool = True,
) -> dict:
    """Generate (or reuse) the folder and measure; prints and returns the numbers.

    Args:
        images: Number of JPEGs in the folder.
        image_size: Typical side of the JPEGs and the training image size.
        epochs: Epochs of ``trainer.fit`` (frozen regime, VGG16, cache on); 0: up to the first
            training step only.
        cache_memory_mb: The feature cache's memory budget; a cache larger than this goes to
            a memory-mapped file.
        predict: After the fit, time ``python -m tlfinetune predict`` over the folder.
        precision: The fit's precision; unset, what ``python -m tlfinetune fit`` picks on this
            machine (bf16-mixed where the CPU has native bf16), so the cache holds what a user's
            cache would.
        folder: Where the images go (reused when it holds ``images`` files already).
        keep: Keep the folder afterwards.
    """
    root = Path(folder) / f"n{images}-{image_size}px"
    if len(list(root.glob("class*/*.jpg"))) != images:
        shutil.rmtree(root, ignore_errors=True)
        print(f"generated {images} JPEGs in {generate(root, images, image_size):.1f} s")
    out: dict = {"images": images}
    for run in ("first scan", "with record"):
        if run == "first scan":
            (root / RECORD_NAME).unlink(missing_ok=True)
        t = time.perf_counter()
        ImageDataModule(root=root, image_size=image_size, augment=False).setup("fit")
        seconds = time.perf_counter() - t
        out[f"setup s ({run})"] = round(seconds, 2)
        out[f"files/s ({run})"] = round(images / seconds)
    out["bookkeeping B/image"] = round(bookkeeping_bytes(root, image_size))
    precision = precision or fastest_precision("cpu") or "32-true"
    out["precision"] = precision
    first, epochs_timer = FirstStep(time.perf_counter()), EpochTimer(torch.device("cpu"))
    cache_size = CacheSize()
    dm = ImageDataModule(root=root, image_size=image_size, augment=False, batch_size=32)
    (root / RECORD_NAME).unlink(missing_ok=True)  # the first run of a new folder scans all
    trainer = pl.Trainer(
        accelerator="cpu", precision=precision, max_epochs=max(epochs, 1),
        limit_train_batches=None if epochs else 1,
        limit_val_batches=None if epochs else 0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[FreezeSchedule(regime="frozen"), FeatureCache(memory_mb=cache_memory_mb),
                   first, epochs_timer, cache_size],
    )  # fmt: skip
    trainer.fit(TransferClassifier(weights="none"), dm)
    out["time to first step s"] = round(first.seconds, 2)
    if epochs:
        out["epoch img/s"] = [round(n / s, 1) for n, s in epochs_timer.epochs]
        where = "file" if (cache_size.mb or 0) > cache_memory_mb else "memory"
        out["cache MB"] = f"{cache_size.mb} ({cache_size.dtype}, in {where})"
    out["peak RSS MB"] = round(peak_rss_mb())
    if predict:
        ckpt = Path(folder) / f"scale-{image_size}px.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)  # a full checkpoint, as fit writes
        measured = run_measured(
            ["predict", f"--ckpt_path={ckpt}", f"--data.predict_dir={root}",
             "--data.batch_size=64", "--trainer.enable_progress_bar=false",
             f"--trainer.default_root_dir={Path(folder) / 'predict'}"],
            pythonpath=None,
        )  # fmt: skip
        out["predict img/s"] = round(images / measured["seconds"], 1)
        out["predict peak RSS MB"] = round(measured["peak_mb"])
    for key, value in out.items():
        print(f"{key:>28}: {value}")
    if not keep:
        shutil.rmtree(root)
    return out


if __name__ == "__main__":
    CLI(scale)
