"""Checkpoints written on a background thread (what ``fit`` on the command line uses).

They must hold the state of the moment they were taken, land on disk in the order asked
(a removal never overtakes a write), report a failed write, and resume exactly.
"""

import lightning.pytorch as pl
import pytest
import torch
from tiny import TinyData

from tlfinetune.freeze import FreezeSchedule
from tlfinetune.module import TransferClassifier
from tlfinetune.runs import BackgroundCheckpointIO, RunCheckpoint


def test_a_checkpoint_holds_the_moment_it_was_taken_and_writes_keep_their_order(tmp_path):
    io = BackgroundCheckpointIO()
    weights = torch.zeros(1000, 1000)
    io.save_checkpoint({"w": weights, "step": 1}, tmp_path / "a.ckpt")
    weights += 1  # the next optimizer step changes the weights in place
    io.save_checkpoint({"w": weights, "step": 2}, tmp_path / "b.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")  # as ModelCheckpoint drops the previous best
    io.wait()
    assert not (tmp_path / "a.ckpt").exists()
    b = io.load_checkpoint(tmp_path / "b.ckpt")
    assert b["step"] == 2 and bool((b["w"] == 1).all())

    io.save_checkpoint({"w": weights}, tmp_path / "c.ckpt")
    weights.zero_()
    assert bool((io.load_checkpoint(tmp_path / "c.ckpt")["w"] == 1).all())  # load waits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.ckpt", "c.ckpt"]  # no temp files
    io.teardown()


def test_a_failed_write_is_reported_and_the_next_one_works(tmp_path):
    io = BackgroundCheckpointIO()
    (tmp_path / "file").write_text("not a folder")
    io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "file" / "x.ckpt")
    with pytest.raises(OSError):
        io.teardown()
    io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "ok.ckpt")
    io.teardown()
    assert (tmp_path / "ok.ckpt").is_file()


class _OnDisk(pl.Callback):
    """Before each step: the mid-epoch checkpoint taken at the last multiple of 2 is on disk."""

    def __init__(self, path):
        self.path, self.checked = path, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step and step % 2 == 0:
            assert torch.load(self.path, weights_only=True)["global_step"] == step
            self.checked += 1


def _fit(folder, epochs, ckpt=None, every=None):
    pl.seed_everything(3)
    model = TransferClassifier(
        num_classes=3, backbone="test_vgg16", weights="none", head_dropout=0.3
    )
    checks = [_OnDisk(folder / "last.ckpt")] if every else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            FreezeSchedule(regime="frozen", milestones={2: "block5"}),
            RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=every),
            *checks,
        ],
        plugins=[BackgroundCheckpointIO()],
    )
    trainer.fit(model, TinyData(n=24, batch_size=8), ckpt_path=ckpt)
    return model, checks


def test_resume_from_background_checkpoints_is_exact(tmp_path):
    whole, _ = _fit(tmp_path / "a", 3)
    _fit(tmp_path / "b", 2)
    resumed, _ = _fit(tmp_path / "b", 3, ckpt=tmp_path / "b" / "last.ckpt")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_a_mid_epoch_checkpoint_is_on_disk_before_the_next_step(tmp_path):
    _, checks = _fit(tmp_path, 2, every=2)
    assert checks[0].checked == 2  # steps 2 and 4 (3 steps an epoch)
