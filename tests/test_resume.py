"""Resume: a run stopped at an epoch boundary and resumed ends where an uninterrupted one ends."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny import tiny_tensors

from tlfinetune import FreezeSchedule, ImageDataModule, TransferClassifier
from tlfinetune.cache import FeatureCache
from tlfinetune.runs import AtomicCheckpointIO

pytestmark = pytest.mark.slow


def datamodule(workers):
    x, y = tiny_tensors(n=40, size=32, num_classes=3, seed=1)
    x = x.permute(0, 2, 3, 1)
    return ImageDataModule.from_arrays(
        x[:28],
        y[:28],
        x[28:],
        y[28:],
        image_size=32,
        batch_size=8,
        augment=False,
        num_workers=workers,
        seed=5,
    )


def run(folder, epochs, milestone, ckpt=None, cache=True, workers=0, dropout=0.3):
    pl.seed_everything(7)
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", head_dropout=dropout, feature_cache=cache
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        deterministic=True,
        logger=False,
        default_root_dir=folder,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            FreezeSchedule(
                regime="frozen", milestones={milestone: "block5"}, backbone_lr_ratio=0.5
            ),
            ModelCheckpoint(dirpath=folder / "ckpt", save_last=True),
            FeatureCache(),  # serves only when the model's feature_cache is on
        ],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule(workers), ckpt_path=ckpt)
    return model, trainer


@pytest.mark.parametrize(
    "milestone, cache, workers",
    [(1, True, 0), (3, True, 0), (1, False, 2), (3, False, 0)],
    ids=["milestone-before-ckpt", "milestone-after-ckpt", "workers-uncached", "uncached"],
)
def test_resumed_run_equals_uninterrupted(tmp_path, milestone, cache, workers):
    whole, t_whole = run(tmp_path / "a", 4, milestone, cache=cache, workers=workers)
    run(tmp_path / "b", 2, milestone, cache=cache, workers=workers)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    resumed, t_resumed = run(tmp_path / "b", 4, milestone, ckpt=last, cache=cache, workers=workers)
    assert t_resumed.current_epoch == 4
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    grads = [[p.requires_grad for p in m.parameters()] for m in (whole, resumed)]
    assert grads[0] == grads[1]
    lrs = [[g["lr"] for g in t.optimizers[0].param_groups] for t in (t_whole, t_resumed)]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 2


def test_kill_and_resume_from_the_command_line(tmp_path):
    """SIGKILL during the second epoch; `fit --ckpt_path last` continues and finishes."""
    root = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "tlfinetune",
        "fit",
        "--data.root=demo",
        "--data.image_size=32",
        "--data.batch_size=32",
        "--model.backbone=test_vgg16",
        "--model.weights=none",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false",
        "--data.num_workers=0",
        "--seed_everything=1",
        "--freeze.milestones={1: block5}",
        "--data.augment=false",
        "--model.feature_cache=false",
    ]
    # The kill comes from inside, as step 13 (epoch 1: the demo's 360 images are 12 batches of
    # 32) is about to run: with a small model an outside kill timed by polling for last.ckpt
    # could land after the run had already finished.
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    killer = ["--trainer.callbacks+=stop_at.KillAt", "--trainer.callbacks.step=13"]
    killed = subprocess.run(
        [*args, *killer], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    assert last.exists()
    epoch_before = torch.load(last, weights_only=True)["epoch"]
    assert epoch_before < 2  # killed before the end
    done = subprocess.run(
        [*args, "--ckpt_path=last"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from" in done.stderr
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 2 and final["global_step"] > 0
    assert not (root / "version_1").exists()  # resumed into the same run folder
    assert len(list((root / "version_0").glob("config*.yaml"))) == 2  # earlier config kept
