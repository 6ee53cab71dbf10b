"""A callback the DDP command-line test adds (--trainer.callbacks+=): every rank's weights."""

from pathlib import Path

import lightning.pytorch as pl
import torch


class RankWeights(pl.Callback):
    """Save each rank's backbone weights when training starts and when the fit ends.

    Args:
        folder: where ``rank<N>.pt`` goes.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.init: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        # After the DDP wrapper broadcast rank 0's weights: the common starting point.
        self.init = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        final = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"init": self.init, "final": final}, self.folder / f"rank{trainer.global_rank}.pt"
        )
