"""The setting of one ``python benchmarks/bench.py`` run, shared by every setup it measures.

Resolved once by :func:`bench.bench` and handed to tlfinetune's own run and to each
peer, so that they all train on the same data, image size, batch size, precision and frozen
layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlfinetune import backbone as bb
from tlfinetune.data import ImageDataModule


@dataclass
class _Setting:
    """Everything a setup needs, resolved once."""

    root: Path | str  # a folder, or "demo"
    image_size: int
    batch_size: int
    precision: str
    epochs: int
    backbone: str
    weights: str
    unfreeze_from: str | None
    device: torch.device
    num_workers: int | None
    seed: int
    work_dir: Path

    def datamodule(self, **kwargs: Any) -> ImageDataModule:
        return ImageDataModule(
            root=self.root,
            image_size=self.image_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            augment=False,
            seed=self.seed,
            **kwargs,
        )

    def trainable_from(self, regime: str) -> int:
        n = bb.get_spec(self.backbone).num_modules
        return {
            "frozen": n,
            "partial": bb.resolve_unfreeze_from(self.backbone, self.unfreeze_from),
            "full": 0,
        }[regime]
