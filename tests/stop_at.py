"""A callback for command-line tests: ``--trainer.callbacks+=stop_at.KillAt``."""

import os
import signal

import lightning.pytorch as pl


class KillAt(pl.Callback):
    """SIGKILL this process when training is about to run global step ``step``: a hard crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TermAt(pl.Callback):
    """SIGTERM this process before training step ``step``, or before predicting batch ``step``.

    What a cluster's scheduler or ``kill`` sends: Lightning stops gracefully.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
