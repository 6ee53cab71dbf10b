"""PredictionWriter: one CSV row per image with the predicted class and the top-k classes."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Write ``predictions.csv``: ``path,label,probability`` then ``top1,top1_probability``...

    Args:
        output: the CSV file; ``predictions.csv`` under ``trainer.default_root_dir`` by default.
        top_k: how many of the most probable classes to list per image.
    """

    def __init__(self, output: str | None = None, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.top_k = top_k
        self._rows: list[tuple[int, list[float]]] = []

    def write_on_batch_end(  # noqa: D102
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        index = batch[1] if isinstance(batch, (tuple, list)) else None
        ids = index.tolist() if torch.is_tensor(index) else list(batch_indices or [])
        self._rows.extend(zip(ids, prediction.float().cpu().tolist(), strict=True))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather every rank's rows; rank 0 writes the file."""
        rows = self._rows
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        self._rows = []
        if trainer.is_global_zero:
            path = self.write(rows, trainer, pl_module)
            print(f"Wrote {len(dict(rows))} predictions to {path}")

    def write(
        self, rows: list[tuple[int, list[float]]], trainer: pl.Trainer, pl_module: Any
    ) -> Path:
        """Write the rows (index into the data's predict files, probabilities) as CSV."""
        path = Path(self.output or Path(trainer.default_root_dir) / "predictions.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        names = pl_module.hparams.get("class_names") or [
            str(i) for i in range(pl_module.hparams.num_classes)
        ]
        files = getattr(trainer.datamodule, "predict_files", None) or []
        k = min(self.top_k, len(names))
        header = ["path", "label", "probability"]
        for i in range(1, k + 1):
            header += [f"top{i}", f"top{i}_probability"]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for index, probs in sorted(dict(rows).items()):
                p = torch.tensor(probs)
                top = torch.topk(p, k)
                name = str(files[index]) if index < len(files) else str(index)
                row = [name, names[top.indices[0]], f"{top.values[0]:.6f}"]
                for value, cls in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    row += [names[cls], f"{value:.6f}"]
                writer.writerow(row)
        tmp.replace(path)
        return path
