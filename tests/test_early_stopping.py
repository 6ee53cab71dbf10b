"""Early stopping that knows the freeze schedule: patience per phase, best weights at the end."""

import lightning.pytorch as pl
import pytest
import torch
from tiny import TinyData

from tlfinetune import FreezeSchedule, TransferClassifier
from tlfinetune.errors import ConfigError
from tlfinetune.runs import AtomicCheckpointIO, RunCheckpoint
from tlfinetune.stopping import ScheduleEarlyStopping

# val/loss per epoch. Milestone at epoch 3; patience 2. Plain early stopping stops after epoch 2
# (two epochs worse than epoch 0); patience counted across the milestone stops after epoch 3;
# per phase, the last phase improves at epoch 4 and stops after 6.
LOSSES = [1.0, 1.1, 1.2, 1.3, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4]


class Scripted(TransferClassifier):
    """Trains as usual; its val/loss is scripted per epoch (val/acc follows it)."""

    def validation_step(self, batch, batch_idx):
        loss = LOSSES[self.current_epoch]
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch[1]))
        self.log("val/acc", 2.0 - loss, on_epoch=True, batch_size=len(batch[1]))


def fit(folder, max_epochs=10, ckpt=None, milestones=None, **stop_kw):
    pl.seed_everything(0)
    model = Scripted(backbone="test_vgg16", weights="none", feature_cache=False)
    stopper = ScheduleEarlyStopping(**{"patience": 2, **stop_kw})
    schedule = FreezeSchedule(milestones={3: "block5"} if milestones is None else milestones)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        default_root_dir=folder,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            schedule,
            RunCheckpoint(dirpath=folder, monitor="val/loss", mode="min", save_last=True),
            stopper,
        ],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, TinyData(n=8, batch_size=8), ckpt_path=ckpt)
    return model, trainer, stopper


def test_stops_only_when_the_last_phase_ran_out_of_patience_and_ends_with_the_best_weights(
    tmp_path, one_thread
):
    model, trainer, stopper = fit(tmp_path)
    assert stopper.stopped_epoch == 6 and trainer.current_epoch == 7  # epochs 0-6 trained
    assert "did not improve for 2 epochs" in stopper.stopped_reason()
    # The best checkpoint (lowest val/loss, epoch 4) is what the model holds at the end.
    best = trainer.checkpoint_callback.best_model_path
    assert "epoch=4" in best
    best_state = torch.load(best, weights_only=True)["state_dict"]
    last_state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(best_state[k], last_state[k]) for k in best_state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, best_state[name]), name
    # Without milestones it is Lightning's early stopping: two epochs worse than epoch 0.
    _, _, plain = fit(tmp_path / "plain", max_epochs=4, milestones={})
    assert plain.stopped_epoch == 2


def test_a_resumed_fit_stops_where_an_uninterrupted_one_does(tmp_path, one_thread):
    fit(tmp_path, max_epochs=5)  # ends after epoch 4: the best so far, no epoch without gain
    _, trainer, stopper = fit(tmp_path, ckpt=tmp_path / "last.ckpt", patience=2)
    # Without the saved state (best 0.9) epoch 5 would count as a gain and the stop come later.
    assert stopper.stopped_epoch == 6 and trainer.current_epoch == 7


def test_patience_must_be_positive_and_monitor_sets_the_mode():
    with pytest.raises(ConfigError, match="patience must be at least 1"):
        ScheduleEarlyStopping(patience=0)
    assert ScheduleEarlyStopping(patience=1).mode == "min"
    assert ScheduleEarlyStopping(patience=1, monitor="val/acc").mode == "max"
    assert not ScheduleEarlyStopping().enabled
