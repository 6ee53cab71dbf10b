"""Where does a training step wait for the GPU? Host-device syncs per step, by call site.

A GPU runs ahead of Python only while nothing reads a value back: every ``.item()``, ``bool()``
of a CUDA tensor, ``torch.unique`` or blocking copy makes the host wait for all queued kernels
and leaves the GPU idle while the next step is prepared. This runs ``trainer.fit`` on random
uint8 images under ``torch.cuda.set_sync_debug_mode("warn")`` for the steady-state steps (after
two warm-up steps) and prints how often each line of code synchronised. Zero per step is the goal.

    python benchmarks/gpu_sync_audit.py --regime frozen --precision bf16-mixed

Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlfinetune import FreezeSchedule, TransferClassifier

WARMUP_STEPS = 2


class SyncWatch(pl.Callback):
    """Switches sync debugging on after the warm-up steps and off at the end of the epoch."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:  # noqa: D102
        if i == WARMUP_STEPS:
            torch.cuda.set_sync_debug_mode("warn")
        if i >= WARMUP_STEPS:
            self.steps += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:  # noqa: D102
        torch.cuda.set_sync_debug_mode(0)


def main() -> None:
    """Parse the arguments, run one epoch, print the sync sites."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", default="frozen", choices=["frozen", "partial", "full"])
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_sync_audit: no CUDA GPU here; run it on a machine with one.")
    n = args.batch_size * (args.steps + WARMUP_STEPS)
    x = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8)
    y = torch.arange(n) % 6
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, pin_memory=True)
    model = TransferClassifier(
        num_classes=6, image_size=args.image_size, weights="none", feature_cache=False
    )
    watch = SyncWatch()
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        precision=args.precision,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FreezeSchedule(regime=args.regime), watch],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    sites = collections.Counter(
        f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
    )
    total = sum(sites.values())
    print(
        f"{args.regime}, {args.precision}, {args.image_size} px, batch {args.batch_size}: "
        f"{total} syncs in {watch.steps} steady-state steps ({total / max(watch.steps, 1):.2f} "
        f"per step)"
    )
    for site, count in sites.most_common(20):
        print(f"  {count / max(watch.steps, 1):6.2f} per step  {site}")


if __name__ == "__main__":
    main()
