"""Tiny synthetic data and trainers for the model tests (the data module has its own tests)."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def tiny_tensors(n: int = 24, size: int = 32, num_classes: int = 3, seed: int = 0):
    """uint8 images whose class is the brightest colour channel: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randint(0, 120, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y % 3] += 100
    return x, y


class TinyData(pl.LightningDataModule):
    def __init__(self, n=24, size=32, num_classes=3, batch_size=8):
        super().__init__()
        self.num_classes, self.image_size, self.batch_size = num_classes, size, batch_size
        self.class_names = [f"c{i}" for i in range(num_classes)]
        self.x, self.y = tiny_tensors(n, size, num_classes)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    test_dataloader = val_dataloader


def trainer(max_epochs=1, callbacks=(), **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def saved_checkpoint(path: Path, datamodule, max_steps: int = 1):
    """A test_vgg16 TransferClassifier trained ``max_steps`` on ``datamodule``, saved to ``path``.

    Returns the trained model (the checkpoint is what a user's fit would have left).
    """
    from tlfinetune import TransferClassifier

    model = TransferClassifier(backbone="test_vgg16", weights="none")
    fit = trainer(max_steps=max_steps, limit_val_batches=0)
    fit.fit(model, datamodule)
    fit.save_checkpoint(path)
    return model


def run_worker(name: str, out: Path) -> None:
    """Run ``tests/<name> OUT`` in a fresh Python (DDP workers start their own processes).

    The tests folder goes before the caller's path (which may point at a checkout), so the
    worker imports this file's neighbours and the package the tests run against.
    """
    worker = Path(__file__).with_name(name)
    path = os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(worker), str(out)],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
