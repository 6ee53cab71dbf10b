"""GPU check: mixed-precision training works and what it costs, per regime and precision.

Run on a machine with a GPU: ``python benchmarks/gpu_check.py [OUT.json]``. Measures, at 224 px
and batch 64 on synthetic uint8 images in memory (so decoding does not limit the GPU):
the no_grad forward bound of the channels-last VGG16 backbone, and training images/s through the
Lightning Trainer for each regime (frozen, partial = block5, full) and precision (32-true,
16-mixed, bf16-mixed), first epoch and later epochs (the feature cache serves later epochs when
the backbone prefix is frozen). Every run must end with a finite loss.
``GPU_CHECK_SMALL=1`` shrinks everything for a dry run on CPU.
"""

import json
import os
import sys
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlfinetune import FreezeSchedule, TransferClassifier

SMALL = os.environ.get("GPU_CHECK_SMALL") == "1"
SIZE, BATCH, N = (32, 8, 32) if SMALL else (224, 64, 1024)
ACCEL = "cpu" if SMALL else "gpu"
EPOCHS = 3


class Data(pl.LightningDataModule):
    """uint8 images in memory; augment=False so the feature cache may engage."""

    augment = False

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(N) % 4
        self.x = torch.randint(0, 255, (N, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
        self.num_classes, self.image_size, self.class_names = 4, SIZE, list("abcd")
        self.train_dataset = TensorDataset(self.x, self.y)
        self.val_dataset = TensorDataset(self.x[: N // 4], self.y[: N // 4])

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=BATCH, shuffle=False, pin_memory=True)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=BATCH, pin_memory=True)


class Timer(pl.Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t)


def forward_bound(precision):
    model = TransferClassifier(num_classes=4, weights="none", image_size=SIZE)
    device = "cuda" if ACCEL == "gpu" else "cpu"
    backbone = model.backbone.to(device).eval()
    x = torch.rand(BATCH, 3, SIZE, SIZE, device=device).contiguous(
        memory_format=torch.channels_last
    )
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    with (
        torch.no_grad(),
        torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        for _ in range(3):
            backbone(x)
        if device == "cuda":
            torch.cuda.synchronize()
        t, reps = time.perf_counter(), 5 if SMALL else 30
        for _ in range(reps):
            backbone(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return reps * BATCH / (time.perf_counter() - t)


def train(precision, regime, cache):
    torch.manual_seed(0)
    model = TransferClassifier(weights="none", feature_cache=cache)
    timer = Timer()
    trainer = pl.Trainer(
        accelerator=ACCEL,
        devices=1,
        precision=precision,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[FreezeSchedule(regime=regime, unfreeze_from="block5"), timer],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, Data())
    fit_seconds = time.perf_counter() - start
    loss = float(trainer.callback_metrics["train/loss"])
    return {
        "precision": precision,
        "regime": regime,
        "cache": cache,
        "first_epoch_img_s": round(N / timer.times[0], 1),
        "later_epochs_img_s": round(N * (EPOCHS - 1) / sum(timer.times[1:]), 1),
        "fit_img_s": round(N * EPOCHS / fit_seconds, 1),
        "final_train_loss": round(loss, 4),
        "finite": bool(torch.isfinite(torch.tensor(loss))),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)
        if torch.cuda.is_available()
        else None,
    }


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "gpu_check.json"
    results = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "size": SIZE,
        "batch": BATCH,
        "images": N,
        "bound": {},
        "runs": [],
    }
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        if ACCEL == "cpu" and precision == "16-mixed":
            continue
        results["bound"][precision] = round(forward_bound(precision), 1)
        for regime, cache in (
            ("frozen", False),
            ("frozen", True),
            ("partial", False),
            ("partial", True),
            ("full", False),
        ):
            results["runs"].append(train(precision, regime, cache))
            print(json.dumps(results["runs"][-1]), flush=True)
    print(json.dumps(results["bound"]))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
