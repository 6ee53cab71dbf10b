"""Resume mid-epoch: a checkpoint taken inside an epoch continues that epoch where it stood."""

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tiny import tiny_tensors

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cli import main
from tlfinetune.runs import AtomicCheckpointIO, RunCheckpoint

pytestmark = pytest.mark.slow

N, BATCH = 40, 4  # 10 batches an epoch
SAVE_EVERY = 3  # global steps 3, 6, ... : steps 12 and 15 fall inside epoch 1
STOP_AT = 15  # stop right after the checkpoint of step 15: epoch 1, batches 0-4 trained
SAVE = {  # --checkpoint.every_n_train_steps, or --checkpoint.train_time_interval (every step)
    "steps": {"every_n_train_steps": SAVE_EVERY},
    "time": {"train_time_interval": timedelta(microseconds=1)},
    "none": {},  # epoch ends only
}


class Seen(pl.Callback):
    """Which images each trained batch held: (epoch, batch_idx, image ids)."""

    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = [hash(image.numpy().tobytes()) for image in batch[0]]
        self.batches.append((trainer.current_epoch, batch_idx, ids))


class Record(Seen):
    """Seen, into a list that outlives a crashed fit."""

    def __init__(self, batches):
        self.batches = batches


class Stop(pl.Callback):
    """A crash right after the checkpoint of step STOP_AT, before the next batch trains."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == STOP_AT:
            raise KeyboardInterrupt  # Lightning's own handling of Ctrl-C, then an exit


def datamodule(workers):
    x, y = tiny_tensors(n=N + 8, size=32, num_classes=3, seed=1)
    x = x.permute(0, 2, 3, 1)
    return ImageDataModule.from_arrays(
        x[:N], y[:N], x[N:], y[N:], image_size=32, batch_size=BATCH, augment=False,
        num_workers=workers, seed=5,
    )  # fmt: skip


def fit(folder, *extra, ckpt=None, workers=0, trigger="steps"):
    pl.seed_everything(7)
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", head_dropout=0.3, feature_cache=False
    )
    seen = Seen()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        deterministic=True,
        logger=False,
        default_root_dir=folder,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            FreezeSchedule(regime="partial", unfreeze_from="block5"),
            RunCheckpoint(dirpath=folder, save_last=True, **SAVE[trigger]),
            seen,
            *extra,
        ],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule(workers), ckpt_path=ckpt)
    return model, seen.batches


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run without a stop (loader workers do not change what it sees or computes)."""
    return fit(tmp_path_factory.mktemp("whole"))


@pytest.mark.parametrize(("workers", "trigger"), [(0, "time"), (2, "steps")])
def test_a_run_stopped_mid_epoch_resumes_where_it_stood(tmp_path, uninterrupted, workers, trigger):
    whole, whole_seen = uninterrupted
    before = []
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C: shut down, exit 1
        fit(tmp_path / "stopped", Stop(), Record(before), workers=workers, trigger=trigger)
    assert torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)["global_step"] == 15
    resumed, after = fit(
        tmp_path / "stopped", ckpt=tmp_path / "stopped" / "last.ckpt", workers=workers
    )
    # Epoch 1 trained batches 0-4 before the stop and 5-9 after it: each image exactly once,
    # in the order the uninterrupted run used.
    assert [b for e, b, _ in before if e == 1] == [0, 1, 2, 3, 4]
    assert [b for e, b, _ in after if e == 1] == [5, 6, 7, 8, 9]
    epoch1 = [ids for e, _, ids in before + after if e == 1]
    assert epoch1 == [ids for e, _, ids in whole_seen if e == 1]
    assert sorted(i for ids in epoch1 for i in ids) == sorted(
        i for e, _, ids in whole_seen if e == 0 for i in ids
    )  # every training image once
    assert [(e, b) for e, b, _ in after] == [(e, b) for e, b, _ in whole_seen if (e, b) >= (1, 5)]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


class CrashInValidation(pl.Callback):
    """A crash in epoch 0's validation: after its last batch trained, before its end."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("term_at", "saved", "resumes_at"),
    [
        (STOP_AT, STOP_AT + 1, (1, 6)),  # epoch 1, batches 0-5 trained: kept
        (19, 10, (1, 0)),  # on epoch 1's last batch: epoch 0's end is the save to resume
    ],
)
def test_sigterm_mid_epoch_keeps_the_epoch_in_progress(
    tmp_path, uninterrupted, term_at, saved, resumes_at
):
    """No step saves. SIGTERM (sent before step ``term_at``) stops fit after that step."""
    from stop_at import TermAt

    whole, whole_seen = uninterrupted
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        fit(tmp_path, TermAt(term_at), trigger="none")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == saved
    resumed, after = fit(tmp_path, ckpt=tmp_path / "last.ckpt", trigger="none")
    assert [(e, b) for e, b, _ in after] == [
        (e, b) for e, b, _ in whole_seen if (e, b) >= resumes_at
    ]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_a_save_due_on_the_last_batch_waits_for_the_epoch_end(tmp_path, uninterrupted):
    """A checkpoint taken on an epoch's last batch made Lightning skip the next epoch on resume;
    saved every step, the last mid-epoch checkpoint is the one before the last batch."""
    whole, whole_seen = uninterrupted
    with pytest.raises(SystemExit):
        fit(tmp_path, CrashInValidation(), trigger="time")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 9
    resumed, after = fit(tmp_path, ckpt=tmp_path / "last.ckpt")
    assert [(e, b) for e, b, _ in after] == [(e, b) for e, b, _ in whole_seen if (e, b) >= (0, 9)]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_sigkill_mid_epoch_and_resume_from_the_command_line(tmp_path, monkeypatch):
    """`--checkpoint.every_n_train_steps`, SIGKILL inside a cached epoch, `fit --ckpt_path last`.

    The frozen regime's epochs 0-1 are one freeze phase (epoch 1 is served from the feature
    cache), then a milestone unfreezes block5 at epoch 2. The kill lands in epoch 1; the resumed
    process has no cache, trains the rest of epoch 1 through the images, then the milestone.
    """
    args = [
        "fit", "--data.root=demo", "--data.image_size=32", "--data.batch_size=32",
        "--data.augment=false", "--data.num_workers=0", "--model.backbone=test_vgg16",
        "--model.weights=none", "--model.head_dropout=0.3", "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false", "--seed_everything=1",
        "--freeze.milestones={2: block5}", "--checkpoint.every_n_train_steps=5",
    ]  # fmt: skip
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}

    def fit(root, *extra):
        return subprocess.run(
            [sys.executable, "-m", "tlfinetune", *args, f"--trainer.default_root_dir={root}",
             *extra],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
        )  # fmt: skip

    # The demo has 360 training images: 12 batches an epoch. Step 15 (epoch 1, batch 2) is
    # saved; the kill comes from inside as step 17 is about to run (an outside kill timed by
    # polling could land after a small model had finished).
    root = tmp_path / "b"
    killed = fit(root, "--trainer.callbacks+=stop_at.KillAt", "--trainer.callbacks.step=17")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "Feature cache:" in killed.stderr  # epoch 1 was being served from the cache
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 15
    resumed = fit(root, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader that can't
    assert not (root / "version_1").exists()  # resumed into the same run folder
    assert len(list((root / "version_0").glob("config*.yaml"))) == 2  # earlier config kept

    # The uninterrupted run, in this process (the command's own code, without a second start).
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it
    main([*args, f"--trainer.default_root_dir={tmp_path / 'a'}"])
    a, b = (torch.load(r / "version_0/checkpoints/last.ckpt", weights_only=True) for r in (
        tmp_path / "a", root))  # fmt: skip
    assert a["global_step"] == b["global_step"] == 36
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)
