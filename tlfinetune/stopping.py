"""Early stopping that knows the freeze schedule: :class:`ScheduleEarlyStopping`.

Lightning's ``EarlyStopping`` (and Keras') counts epochs without improvement over the whole
fit. With a freeze schedule that is wrong twice over: the head-only phase often plateaus before
the milestone that unfreezes the backbone, so plain early stopping ends the run before
fine-tuning ever starts; and the epochs right after an unfreeze are judged by the patience the
previous phase used up. Here patience counts within a freeze phase (it restarts at each
milestone) and a run never stops before the last milestone has had its patience.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from tlfinetune.errors import ConfigError
from tlfinetune.freeze import FreezeSchedule

__all__ = ["Monitor", "ScheduleEarlyStopping"]

log = logging.getLogger(__name__)

Monitor = Literal["val/loss", "val/acc", "val/f1", "val/balanced_acc"]


class ScheduleEarlyStopping(EarlyStopping):
    """Stop when the monitored metric stops improving, one freeze phase at a time.

    Lightning's ``EarlyStopping`` with three differences: the count of epochs without
    improvement restarts at every milestone of the :class:`~tlfinetune.freeze.FreezeSchedule`;
    running out of patience before the last milestone does not stop the run (that milestone
    still unfreezes and trains for at least ``patience`` epochs); and at the end of a fit that
    stopped early, the weights of the best checkpoint are loaded back into the model (Keras'
    ``restore_best_weights``), so evaluating the model in the same process evaluates the best
    epoch, not the last. The best value so far is kept across phases: a later phase must beat
    the earlier ones. Its state (best value, epochs without improvement) is saved in
    checkpoints, so a resumed fit stops where an uninterrupted one would.

    Args:
        patience: validation epochs without improvement, within a freeze phase, before
            training stops; ``None`` (the default) turns early stopping off.
        monitor: the validation metric watched; ``val/loss`` is minimised, the others
            maximised.
        min_delta: smallest change that counts as an improvement.
        restore_best: after stopping early, load the best checkpoint's weights into the model.
    """

    def __init__(
        self,
        patience: int | None = None,
        monitor: Monitor = "val/loss",
        min_delta: float = 0.0,
        restore_best: bool = True,
    ) -> None:
        if patience is not None and patience < 1:
            raise ConfigError(
                f"early_stopping.patience must be at least 1 (epochs without improvement), got "
                f"{patience}; leave it out to train for all of trainer.max_epochs."
            )
        mode = "min" if monitor.endswith("loss") else "max"
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience or 1, mode=mode)
        self.enabled = patience is not None
        self.restore_best = restore_best
        self._held_for: int | None = None  # the milestone a withdrawn stop waited for (log once)

    @property
    def stopped(self) -> bool:
        """Whether this callback stopped the fit."""
        return self.stopping_reason != EarlyStoppingReason.NOT_STOPPED

    # --- the schedule --------------------------------------------------------------------------

    @staticmethod
    def _milestones(trainer: pl.Trainer) -> list[int]:
        schedule = FreezeSchedule.find(trainer)
        return [epoch for epoch, _ in schedule.steps[1:]] if schedule else []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At a milestone, the new phase gets the full patience."""
        if self.enabled and trainer.current_epoch in self._milestones(trainer):
            self.wait_count = 0

    # --- Lightning's check, held back before the last milestone --------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: D102
        if self.enabled:
            super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        if self.enabled:
            self._checked(trainer, super().on_train_epoch_end, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        if self.enabled:
            self._checked(trainer, super().on_validation_end, pl_module)

    def _checked(self, trainer: pl.Trainer, check: Any, pl_module: pl.LightningModule) -> None:
        """Lightning's check; a stop for lost patience is withdrawn while a milestone is ahead."""
        before = trainer.should_stop
        check(trainer, pl_module)
        ahead = [m for m in self._milestones(trainer) if m > trainer.current_epoch]
        if self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED and ahead:
            # The same decision on every process: it depends on the epoch and schedule only.
            trainer.should_stop = before
            self.stopped_epoch = 0
            self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
            self.stopping_reason_message = None
            if self._held_for == ahead[0]:
                return
            self._held_for = ahead[0]
            log.info(
                f"Early stopping: {self.monitor} has not improved for {self.wait_count} epoch(s), "
                f"but the freeze schedule unfreezes more at epoch {ahead[0]}: training goes on."
            )
        elif self.stopping_reason_message and trainer.should_stop and not before:
            log.info(f"Early stopping at epoch {trainer.current_epoch}: {self.stopped_reason()}")

    def stopped_reason(self) -> str:
        """Why the run stopped, in words (empty when it did not stop early)."""
        if self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            epochs = "epoch" if self.wait_count == 1 else "epochs"
            return (
                f"{self.monitor} did not improve for {self.wait_count} {epochs} "
                f"(best {float(self.best_score):.4f})."
            )
        return self.stopping_reason_message or ""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's best value and count; the patience stays this run's own."""
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    # --- the best weights at the end -----------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After an early stop, load the best checkpoint's weights into the model."""
        if not (self.enabled and self.restore_best and self.stopped):
            return
        ckpt = trainer.checkpoint_callback
        path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if not path:
            log.warning(
                "Early stopping: no best checkpoint was saved; the model keeps its last weights."
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        pl_module.load_state_dict(state)
        log.info(
            f"Early stopping: the model now holds the best checkpoint's weights ({path}, "
            f"best {ckpt.monitor}), not those of the last epoch."
        )
