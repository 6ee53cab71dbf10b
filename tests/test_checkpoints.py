"""RunCheckpoint: last.ckpt shares the best checkpoint's file when both are the same save."""

import os

import lightning.pytorch as pl
import pytest
import torch
from tiny import TinyData, trainer

from tlfinetune import TransferClassifier
from tlfinetune.runs import AtomicCheckpointIO, RunCheckpoint

# val/loss per epoch: epochs 0 and 2 improve, 1 and 3 do not.
LOSSES = [1.0, 1.1, 0.9, 1.2]


class Scripted(TransferClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", LOSSES[self.current_epoch], on_epoch=True, batch_size=len(batch[1]))


def fit(folder, max_epochs, ckpt=None):
    pl.seed_everything(0)
    model = Scripted(backbone="test_vgg16", weights="none", feature_cache=False)
    saver = RunCheckpoint(dirpath=folder, monitor="val/loss", mode="min", save_last=True)
    t = trainer(max_epochs, [saver], enable_checkpointing=True, plugins=[AtomicCheckpointIO()])
    t.fit(model, TinyData(n=8, batch_size=8), ckpt_path=ckpt)
    return t


def loaded(path, folder):
    """The checkpoint's contents, with its run folder's name taken out of its paths."""

    def plain(value):
        if isinstance(value, dict):  # callback states are keyed by their settings: dirpath too
            return {plain(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(plain(v) for v in value)
        if isinstance(value, str):
            return value.replace(str(folder), "RUN")
        return value

    return plain(torch.load(path, weights_only=True))


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("epochs", [1, 3])
def test_last_links_the_best_saved_at_its_step_with_the_contents_of_a_write(
    tmp_path, monkeypatch, one_thread, epochs
):
    linked = fit(tmp_path / "linked", epochs)
    best = linked.checkpoint_callback.best_model_path
    last = tmp_path / "linked" / "last.ckpt"
    assert os.path.samefile(best, last)  # epochs 0 and 2 improve: the last of them is the best
    monkeypatch.setattr(RunCheckpoint, "_link", staticmethod(lambda *args: False))
    fit(tmp_path / "written", epochs)
    written = tmp_path / "written" / "last.ckpt"
    assert os.stat(written).st_nlink == 1
    assert same(loaded(last, tmp_path / "linked"), loaded(written, tmp_path / "written"))


@pytest.mark.parametrize("epochs", [1, 3])
def test_a_later_last_replaces_the_link_and_leaves_the_best_alone(tmp_path, one_thread, epochs):
    folder = tmp_path / "run"
    trainer = fit(folder, epochs)
    best = trainer.checkpoint_callback.best_model_path
    before = loaded(best, folder)
    (state,) = [v for k, v in before["callbacks"].items() if k.startswith("RunCheckpoint")]
    assert state["last_model_path"] == "RUN/last.ckpt"  # as in a written last.ckpt, epoch 0 too
    # Resumed from the linked last.ckpt: the next epoch (1 or 3) does not improve, so last.ckpt
    # is written anew under its own name (not last-v1.ckpt).
    trainer = fit(folder, epochs + 1, ckpt=folder / "last.ckpt")
    assert trainer.checkpoint_callback.best_model_path == best
    assert sorted(p.name for p in folder.iterdir()) == sorted([os.path.basename(best), "last.ckpt"])
    assert not os.path.samefile(best, folder / "last.ckpt")
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == epochs
    assert same(loaded(best, folder), before)


def test_a_file_system_without_links_gets_a_written_last(tmp_path, monkeypatch, one_thread):
    def refuse(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    trainer = fit(tmp_path, 3)
    best = trainer.checkpoint_callback.best_model_path
    assert not os.path.samefile(best, tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_last_ckpt_left_by_another_run_keeps_its_name_and_contents(tmp_path, one_thread):
    (tmp_path / "last.ckpt").write_bytes(b"another run's")
    trainer = fit(tmp_path, 1)
    # Lightning's version counter names this run's last.ckpt last-v1.ckpt, and so does the
    # name the first best file records: the two are still one file.
    assert (tmp_path / "last.ckpt").read_bytes() == b"another run's"
    assert os.path.samefile(trainer.checkpoint_callback.best_model_path, tmp_path / "last-v1.ckpt")


class Peek(pl.Callback):
    """global_step of last.ckpt after each training batch (None: not written yet)."""

    def __init__(self, folder):
        self.folder, self.seen = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        path = self.folder / "last.ckpt"
        step = torch.load(path, weights_only=True)["global_step"] if path.exists() else None
        self.seen.append((trainer.global_step, step))


@pytest.mark.parametrize("save", ["every_n_train_steps", "train_time_interval"])
def test_step_and_time_saves_keep_the_best_at_the_validated_weights(tmp_path, one_thread, save):
    from datetime import timedelta

    every = {"every_n_train_steps": 1, "train_time_interval": timedelta(microseconds=1)}[save]
    pl.seed_everything(0)
    model = Scripted(backbone="test_vgg16", weights="none", feature_cache=False)
    saver = RunCheckpoint(
        dirpath=tmp_path, monitor="val/loss", mode="min", save_last=True, save_top_k=2,
        **{save: every},
    )  # fmt: skip
    peek = Peek(tmp_path)
    t = trainer(3, [saver, peek], enable_checkpointing=True, plugins=[AtomicCheckpointIO()])
    t.fit(model, TinyData(n=8, batch_size=2))  # 4 steps an epoch; val/loss 1.0, 1.1, 0.9

    # The two best: epochs 0 and 2, each holding the weights its val/loss was measured on (the
    # end of that epoch), not a later step's ranked by that score.
    kept = {}
    for path, score in saver.best_k_models.items():
        ckpt = torch.load(path, weights_only=True)
        kept[ckpt["epoch"]] = (ckpt["global_step"], round(score.item(), 4))
    assert kept == {0: (4, 1.0), 2: (12, 0.9)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(os.path.basename(p) for p in saver.best_k_models), "last.ckpt"]
    )
    # Mid-epoch saves write last.ckpt in every epoch, the first one included. (Lightning runs
    # checkpoint callbacks last: Peek sees the save of the step before.)
    assert peek.seen == [(1, None), *((step, step - 1) for step in range(2, 13))]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_get_the_mode_of_any_file_the_user_writes(tmp_path, umask):
    old = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "last.ckpt")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "last.ckpt").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o666 & ~umask


def test_a_moved_run_folder_resumes_into_its_own_last_ckpt(tmp_path, one_thread):
    fit(tmp_path / "before", 1)
    (tmp_path / "before").rename(tmp_path / "after")
    folder = tmp_path / "after"

    t = fit(folder, 3, ckpt=folder / "last.ckpt")  # epoch 1 does not improve, epoch 2 does

    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [os.path.basename(t.checkpoint_callback.best_model_path), "last.ckpt"]
    )  # not a last-v1.ckpt beside an older last.ckpt
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2
    assert os.path.dirname(t.checkpoint_callback.best_model_path) == str(folder)


def test_step_saves_keep_the_state_key_runs_were_saved_under():
    ours = RunCheckpoint(monitor="val/loss", every_n_train_steps=5)
    before = ours.state_key  # what Lightning's settings give, and every earlier run saved under
    ours.setup(trainer(), None, "fit")
    assert ours._every_n_epochs == 1  # ranks at epoch end now
    # so that a run saved before then resumes with its best and last files
    assert ours.state_key == before
    assert "'every_n_epochs': 0" in before
