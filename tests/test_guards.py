"""Guarded runs: NaN losses, unwritable outputs, unsafe checkpoints, interrupted saves."""

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny import TinyData, trainer

from tlfinetune import TLFinetuneError, TransferClassifier
from tlfinetune.cli import main
from tlfinetune.runs import AtomicCheckpointIO


def test_non_finite_loss_stops_training_with_epoch_and_step():
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=3, image_size=32,
        optimizer=partial(torch.optim.SGD, lr=1e12),
    )  # fmt: skip
    with pytest.raises(TLFinetuneError) as err:
        trainer(5).fit(model, TinyData())
    text = str(err.value)
    assert "epoch" in text and "step" in text and "learning rate" in text


def test_deferred_non_finite_check_names_first_bad_step_and_saves_no_checkpoint(tmp_path):
    # On a GPU the loss is read back only every N steps (no per-step sync); what happens
    # between checks must still stop the run before a checkpoint holds NaN weights.
    model = TransferClassifier(
        backbone="test_vgg16", weights="none", num_classes=3, image_size=32,
        optimizer=partial(torch.optim.SGD, lr=1e12),
    )  # fmt: skip
    model.nonfinite_check_every = 1000  # only the epoch-end / checkpoint checks remain
    every_step = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)
    run = trainer(5, callbacks=[every_step], enable_checkpointing=True)
    with pytest.raises(TLFinetuneError, match=r"at epoch 0, step [0-2] \(batch [0-2]\)"):
        run.fit(model, TinyData())  # 3 steps per epoch: the first bad one is in epoch 0
    for path in tmp_path.glob("*.ckpt"):
        weights = torch.load(path, weights_only=True)["state_dict"].values()
        assert all(torch.isfinite(w).all() for w in weights), path


def cli(tmp_path, monkeypatch, capsys, *args):
    """(exit code, stderr) of ``python -m tlfinetune ARGS``, run in this process.

    main() is the command's entry point; test_cli runs the command itself once in a new
    interpreter, which costs ~10 s of imports per run.
    """
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    return stop.value.code, capsys.readouterr().err


def test_unwritable_output_folder_fails_before_training(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = cli(
        tmp_path, monkeypatch, capsys, "fit", "--data.root=demo", "--model.weights=none",
        f"--trainer.default_root_dir={blocker / 'runs'}",
    )  # fmt: skip
    assert code == 2 and "cannot be written" in err and "a_file" in err
    assert "Traceback" not in err


def test_checkpoint_with_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, evil)
    code, err = cli(
        tmp_path, monkeypatch, capsys, "validate", f"--ckpt_path={evil}", "--data.root=demo"
    )
    assert code == 2 and "evil.ckpt" in err and "refused" in err
    assert not marker.exists()


def test_interrupted_checkpoint_save_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt  # as if the process were interrupted mid-save

    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2, "x": Boom()}, path)
    assert io.load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil

    from tlfinetune.cli import check_writable
    from tlfinetune.errors import ConfigError

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 2**20))
    with pytest.raises(ConfigError, match=r"Only 1 MB are free.*runs"):
        check_writable(tmp_path / "runs")
