"""The command line end to end, in-process, on tiny image folders and the demo dataset."""

import csv
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import yaml
from PIL import Image

from tlfinetune.cli import main
from tlfinetune.runs import RunCheckpoint

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.num_workers=0",
]


def make_folder(root: Path, classes=("ants", "bees", "wasps"), per_class=6, size=40):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            pixels[..., c] += 120  # learnable: the class is the bright channel
            path = root / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


def run(*args):
    main([*args])


def fit_args(data: Path, out: Path, *extra):
    return [
        "fit",
        f"--data.root={data}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--model.backbone=test_vgg16",  # VGG16's layout, 1/16 of its channels
        "--model.weights=none",
        f"--trainer.default_root_dir={out}",
        "--trainer.max_epochs=2",
        "--data.val_split=0.34",
        *FAST,
        *extra,
    ]


@pytest.mark.slow
def test_fit_validate_test_predict(tmp_path, capfd, caplog, recwarn):
    data, out = make_folder(tmp_path / "data"), tmp_path / "runs"
    run(*fit_args(data, out, "--freeze.regime=frozen", "--freeze.milestones={1: block5}"))
    version = out / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    assert last.is_file() and list((version / "checkpoints").glob("best-*.ckpt"))
    assert (version / "config.yaml").is_file() and (version / "metrics.csv").is_file()
    printed = capfd.readouterr()
    summary = printed.out
    assert "Best val/acc" in summary and str(last) in summary
    # The console keeps to what the user needs: no advert, no warnings that do not apply.
    console = printed.out + printed.err + caplog.text + "".join(str(w.message) for w in recwarn)
    for noise in ("litlogger", "logging interval", "not supported by the model summary"):
        assert noise not in console
    assert "train/loss" in (version / "metrics.csv").read_text()  # logged once an epoch

    # A second run into the same folder gets its own version and does not trip on config.yaml.
    run(*fit_args(data, out, "--trainer.max_epochs=1"))
    assert (out / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert last.is_file()

    run(
        "validate",
        f"--ckpt_path={last}",
        f"--data.root={data}",
        "--data.val_split=0.34",
        f"--trainer.default_root_dir={tmp_path / 'val'}",
        *FAST,
    )
    # Next to --ckpt_path, the checkpoint's architecture wins (said so), the user's settings win.
    caplog.set_level("INFO", logger="tlfinetune")
    run(
        "validate", f"--ckpt_path={last}", f"--data.root={data}", "--data.val_split=0.34",
        "--model.backbone=vgg11", "--model.label_smoothing=0.2",
        f"--trainer.default_root_dir={tmp_path / 'val'}", *FAST,
    )  # fmt: skip
    assert "--model.backbone='vgg11' ignored" in caplog.text
    assert "--model.label_smoothing: using your 0.2" in caplog.text
    run(
        "test",
        f"--ckpt_path={last}",
        f"--data.root={tmp_path / 'data'}",
        "--data.val_split=0.34",
        f"--trainer.default_root_dir={tmp_path / 'val'}",
        *FAST,
    )

    for name in ("metrics.json", "confusion_matrix.png", "mistakes.png"):
        assert (tmp_path / "val" / name).is_file(), name
    # Three reports into one folder: none replaced, each run's files share a number.
    for number, stage in (("", "validate"), (".1", "validate"), (".2", "test")):
        metrics = json.loads((tmp_path / "val" / f"metrics{number}.json").read_text())
        assert metrics["stage"] == stage
        for name in ("confusion_matrix", "mistakes"):
            assert (tmp_path / "val" / f"{name}{number}.png").is_file()
    assert (version / "learning_curves.png").is_file()

    images = tmp_path / "new"
    make_folder(images, classes=("x", "y/deeper"), per_class=2, size=50)
    (images / "notes.txt").write_text("not an image")
    run(
        "predict",
        f"--ckpt_path={last}",
        f"--data.predict_dir={images}",
        f"--trainer.default_root_dir={tmp_path / 'pred'}",
        *FAST,
    )
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert list(rows[0])[:5] == ["path", "label", "probability", "top1", "top1_probability"]
    assert all(r["label"] in ("ants", "bees", "wasps") for r in rows)
    assert all(r["label"] == r["top1"] and 0 < float(r["probability"]) <= 1 for r in rows)
    probs = [sum(float(r[f"top{i}_probability"]) for i in (1, 2, 3)) for r in rows]
    assert probs == pytest.approx([1.0] * 4, abs=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("fit", f"--config={config}", "--print_config")
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"] == "vgg16"
    assert printed["freeze"]["regime"] in ("frozen", "partial")


def test_readmes_time_based_checkpoint_flag_saves_every_thirty_minutes(tmp_path, monkeypatch):
    """README: ``--checkpoint.train_time_interval 0:30:00`` reaches the checkpoint callback as
    30 minutes (mid-epoch resume from a time-based checkpoint: test_resume_mid_epoch.py)."""
    trainers = []
    monkeypatch.setattr(
        pl.Trainer, "fit", lambda trainer, *args, **kwargs: trainers.append(trainer)
    )
    run("fit", "--model.backbone=test_vgg16", "--model.weights=none", "--data.image_size=32",
        f"--trainer.default_root_dir={tmp_path}",
        "--checkpoint.train_time_interval=0:30:00")  # fmt: skip
    (saver,) = [c for c in trainers[0].callbacks if isinstance(c, RunCheckpoint)]
    assert saver._train_time_interval == timedelta(minutes=30)


def test_seed_configs_say_what_the_seed_says():
    transfer = yaml.safe_load((CONFIGS[0].parent / "vgg16_transfer.yaml").read_text())
    finetune = yaml.safe_load((CONFIGS[0].parent / "vgg16_finetune.yaml").read_text())
    for cfg in (transfer, finetune):
        assert cfg["data"]["image_size"] == 224 and cfg["model"]["weights"] == "imagenet"
        assert cfg["model"]["head"] == "flatten" and cfg["model"]["head_hidden"] == 256
        assert cfg["trainer"]["max_epochs"] == 10
        assert cfg["freeze"]["backbone_lr_ratio"] == 1.0
        assert cfg["model"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert transfer["freeze"]["regime"] == "frozen"
    assert finetune["freeze"] == {
        "regime": "partial",
        "unfreeze_from": 15,
        "backbone_lr_ratio": 1.0,
    }


@pytest.mark.slow
def test_quickstart_runs_shortened(tmp_path, capsys, caplog):
    config = CONFIGS[0].parent / "quickstart.yaml"
    run(
        "fit",
        f"--config={config}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--freeze.milestones={1: block5_conv1}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        *FAST,
    )
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()


def cli_error(tmp_path, *args):
    """Run the CLI as a user would; return (exit code, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tlfinetune", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_the_command_exits_with_the_message_and_no_traceback(tmp_path):
    args = ("fit", "--model.weights=none", "--data.root=missing_folder")
    code, err = cli_error(tmp_path, *args, "--trainer.max_epochs=1")
    assert code == 2
    assert "missing_folder" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--data.root=missing_folder"], ["missing_folder"]),
        (
            ["--data.root=demo", "--freeze.regime=partial", "--freeze.unfreeze_from=block9"],
            ["block9", "block5"],
        ),
        (["--data.root=demo", "--model.backbone=resnet9000"], ["resnet9000", "vgg16_bn"]),
        (["--data.root=demo", "--model.weights=nowhere.pth"], ["nowhere.pth"]),
        (
            ["--data.root=demo", "--model.head_hiden=1"],
            ["head_hiden", "did you mean --model.head_hidden"],
        ),
        (["--data.root=demo", "--freeze.regime=sometimes"], ["sometimes", "frozen"]),
        (["--data.root=demo", "--ckpt_path=last"], ["last.ckpt", "nothing to resume"]),
    ],
)
def test_errors_exit_nonzero_with_a_message(tmp_path, monkeypatch, capsys, args, words):
    # The entry point of `python -m tlfinetune`, in this process: starting an interpreter per
    # case costs ~12 s of imports here; the test above covers the command itself.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.weights=none", *args, "--trainer.max_epochs=1"])
    code, err = stop.value.code, capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_the_old_bench_command_says_where_the_benchmark_went(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--image_size", "64"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "python benchmarks/bench.py --image_size 64" in err and "\n" not in err.strip()
