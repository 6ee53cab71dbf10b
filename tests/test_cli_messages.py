"""Bad settings and interruptions: a one-paragraph message, the right exit code, nothing lost.

Most cases run the entry point in this process (an interpreter start costs ~4.5 s); the SIGTERM
case runs ``python -m tlfinetune`` as a user does, since its exit code is the process's.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlfinetune.cli import main

TESTS = Path(__file__).parent
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.num_workers=0",
]


def folder(root: Path, classes=("a", "b"), per_class=5) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        for i in range(per_class):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return root


def base(data: Path, runs: Path, *extra: str, command: str = "fit") -> list[str]:
    return [
        command,
        f"--data.root={data}",
        "--data.image_size=32",
        "--data.batch_size=4",
        "--data.val_split=0.2",
        "--model.backbone=test_vgg16",
        "--model.weights=none",
        f"--trainer.default_root_dir={runs}",
        "--trainer.max_epochs=1",
        *QUIET,
        *extra,
    ]


def fails(capsys, args: list[str]) -> tuple[int, str]:
    """Run the entry point in this process; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return stop.value.code, err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return folder(tmp_path_factory.mktemp("data") / "imgs")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--trainer.accelerator=gpu"], ["--trainer.accelerator gpu", "no GPU", "cpu"]),
        (["--trainer.accelerator=tpu"], ["--trainer.accelerator tpu", "no TPU"]),
        (["--trainer.accelerator=bogus"], ["accelerator='bogus'", "--trainer"]),
        (["--model.optimizer.lr=-1"], ["--model.optimizer", "-1", "positive learning rate"]),
        (["--checkpoint.monitor=val/bogus"], ["--checkpoint.monitor val/bogus", "val/acc"]),
        (["--checkpoint.monitor=val/acuracy"], ["Did you mean val/acc?"]),
    ],
)
def test_settings_lightning_would_reject_are_named_before_anything_runs(
    data, tmp_path, monkeypatch, capsys, extra, words
):
    from lightning.pytorch.accelerators import AcceleratorRegistry

    for kind in ("cuda", "mps", "tpu"):  # as on a CPU-only machine, also on one with a GPU
        accelerator = AcceleratorRegistry[kind]["accelerator"]
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: False))
    runs = tmp_path / "runs"
    code, err = fails(capsys, base(data, runs, *extra))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1  # one paragraph
    for word in words:
        assert word in err
    assert not runs.exists()  # no run folder, no config.yaml: the root it made is gone too


def test_a_file_where_the_run_folder_goes_is_named_and_kept(data, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "version_0").write_text("my notes")
    code, err = fails(capsys, base(data, runs))
    assert code == 2 and f"{runs / 'version_0'} is a file" in err
    assert (runs / "version_0").read_text() == "my notes"


def test_a_misconfiguration_lightning_finds_late_is_a_plain_error(tmp_path, capsys):
    # The last resort for what no check above names: Lightning's message, exit 2, no traceback.
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    import tlfinetune.cli as cli

    def refuse(*args, **kwargs):
        raise MisconfigurationException("Something\nLightning cannot do")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "TLFinetuneCLI", refuse)
        code, err = fails(capsys, ["fit"])
    assert code == 2
    assert err == "error: Lightning rejects a setting: Something Lightning cannot do.\n"


@pytest.mark.parametrize("command", ["fit", "test", "export"])
def test_a_file_that_is_no_lightning_checkpoint_is_refused_before_anything_is_written(
    data, tmp_path, capsys, command
):
    torch.save({"a": 1}, tmp_path / "dict.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    runs = tmp_path / "runs"
    for name, why in [
        ("dict.ckpt", "it has no state_dict"),
        ("text.ckpt", "it is not a file written by torch.save"),
    ]:
        # The default weights (ImageNet) too: the checkpoint's would replace them, so the
        # message is about the checkpoint, not about downloading weights.
        args = [a for a in base(data, runs, command=command) if "weights" not in a]
        if command == "export":
            args = ["export", f"--output={runs / 'model.onnx'}"]
        code, err = fails(capsys, [*args, f"--ckpt_path={tmp_path / name}"])
        assert code == 2
        assert f"{tmp_path / name} is not a Lightning checkpoint ({why}" in err
        assert "pass a .ckpt written by fit" in err
        assert not runs.exists()


def fit_command(tmp_path: Path, data: Path, runs: Path, *extra: str):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "tlfinetune", *base(data, runs, *extra)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_sigterm_stops_fit_with_143_and_says_how_to_resume(data, tmp_path, capsys):
    # 8 training images in batches of 4: 2 steps an epoch; the signal comes before step 4, the
    # first of epoch 3, after last.ckpt of epoch 2. (At an epoch's last step Lightning ends the
    # epoch first.)
    runs = tmp_path / "runs"
    stopped = fit_command(
        tmp_path,
        data,
        runs,
        "--trainer.max_epochs=4",
        "--trainer.callbacks+=stop_at.TermAt",
        "--trainer.callbacks.step=4",
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    assert (
        f"fit stopped on SIGTERM after 2 complete epochs. The last checkpoint is {last} (every "
        "step trained so far): resume with the same command plus --ckpt_path last."
        in stopped.stderr
    )
    assert torch.load(last, weights_only=True)["global_step"] == 5  # epoch 2's first step kept
    assert "Best val/acc" not in stopped.stdout  # no summary of a run that did not end
    # A resume that asks for fewer epochs than the run has trained: said before it restores.
    saved = last.read_bytes()
    code, err = fails(capsys, [*base(data, runs), "--ckpt_path=last"])
    assert code == 2
    assert "has already trained 2 epochs, more than --trainer.max_epochs 1" in err
    assert "raise --trainer.max_epochs above 2" in err
    assert last.read_bytes() == saved


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A 2-class run of one epoch: its last.ckpt."""
    runs = tmp_path_factory.mktemp("trained")
    main(base(data, runs))
    return runs / "version_0" / "checkpoints" / "last.ckpt"


def test_sigterm_stops_predict_and_keeps_the_earlier_predictions(
    data, trained, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "predictions.csv"
    out.write_text("earlier,predictions\n")
    monkeypatch.syspath_prepend(str(TESTS))
    args = base(data, tmp_path / "runs", command="predict")
    args = [a for a in args if not a.startswith(("--trainer.max_epochs", "--data.val_split"))]
    code, err = fails(
        capsys,
        [
            *args,
            f"--ckpt_path={trained}",
            f"--prediction.output={out}",
            "--prediction.overwrite=true",  # a finished run would replace it; a stopped one not
            "--trainer.callbacks+=stop_at.TermAt",
            "--trainer.callbacks.step=0",
        ],
    )
    assert code == 128 + signal.SIGTERM
    assert "predict stopped on SIGTERM" in err
    assert out.read_text() == "earlier,predictions\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".predictions")] == []


def test_a_checkpoint_on_data_with_other_classes_names_both(trained, tmp_path, capsys):
    other = folder(tmp_path / "three", classes=("a", "b", "c"), per_class=3)
    code, err = fails(
        capsys, [*base(other, tmp_path / "runs", command="test"), f"--ckpt_path={trained}"]
    )
    assert code == 2
    assert (
        f"The checkpoint {trained} has classes ['a', 'b'] (2), the data has classes "
        "['a', 'b', 'c'] (3)." in err
    )
    assert "point --data.root at images of its classes" in err
    assert "--data.num_classes" not in err  # no such flag


def test_weights_restored_from_a_checkpoint_are_said_to_be(data, trained, tmp_path, data_log):
    main([*base(data, tmp_path / "runs", command="test"), f"--ckpt_path={trained}"])
    said = data_log.text
    assert f"weights from checkpoint {trained}" in said and "random initialisation" not in said
    data_log.clear()
    runs = tmp_path / "resumed"
    shutil.copytree(trained.parents[1], runs / "version_0")
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["tlfinetune"]["weights_origin"] = "imagenet (as if)"  # what a real run's says
    torch.save(ckpt, last)
    main([*base(data, runs, "--trainer.max_epochs=2"), "--ckpt_path=last"])
    said = data_log.text
    assert f"weights from checkpoint {last}" in said and "No pretrained weights" not in said
    # The resumed checkpoint still says where the backbone's weights first came from.
    # (last-v1.ckpt: the copied checkpoint's callback state names the folder it came from.)
    newest = max(last.parent.glob("last*.ckpt"), key=lambda f: f.stat().st_mtime)
    resumed = torch.load(newest, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["tlfinetune"]["weights_origin"] == "imagenet (as if)"


def test_a_bad_milestone_is_named_as_one(data, tmp_path, capsys):
    code, err = fails(capsys, base(data, tmp_path / "runs", "--freeze.milestones={3: nope}"))
    assert code == 2
    assert "--freeze.milestones, milestone 3: 'nope' names no layer of test_vgg16" in err
    assert "unfreeze_from" not in err


def test_weights_errors_give_the_python_form_too():
    from tlfinetune import TransferClassifier
    from tlfinetune.errors import WeightsError

    with pytest.raises(WeightsError, match='--model.weights none \\(weights="none" in Python\\)'):
        TransferClassifier(backbone="test_vgg16", weights="imagenet", num_classes=2)


def test_the_top_level_help_lists_every_command_under_the_name_the_user_typed(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "tlfinetune", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    out = shown.stdout
    assert out.startswith("usage: python -m tlfinetune ")
    assert "Adapt a pretrained torchvision image classifier" in out
    assert "__main__" not in out and "Lightning Trainer command line tool" not in out
    commands = ["fit", "validate", "test", "predict", "export", "compare", "lr_find", "backbones"]
    for command in commands:  # each on its own line, with what it does
        assert re.search(rf"^  {command} +\w+", out, re.MULTILINE), command


@pytest.mark.parametrize(
    "args, files, words",
    [
        (["fitt"], {}, ["'fitt' is not a command", "lr_find, backbones", "Did you mean fit?"]),
        (["fit", "--model.head_hiden=1"], {}, ["did you mean --model.head_hidden"]),
        (
            ["fit", "--config=typo.yaml"],
            {"typo.yaml": "model:\n  head_hiden: 3\n"},
            ["unknown key model.head_hiden (in typo.yaml)", "Did you mean model.head_hidden"],
        ),
        (
            ["fit", "--config=bad.yaml"],
            {"bad.yaml": "model:\n  head_hidden: [3\n"},
            ["in bad.yaml, line 2"],
        ),
        (["fit", "--config=missing.yaml"], {}, ["--config", "missing.yaml", "does not exist"]),
        (["fit", "--model.head_hidden=abc"], {}, ["--model.head_hidden: expected int", "abc"]),
        (["fit", "--trainer.precision=7"], {}, ["--trainer.precision 7", "bf16-mixed"]),
        (["predict", "--prediction.tta=bogus"], {}, ["--prediction.tta", "'flip'", "bogus"]),
        (["export", "--ckpt_path=x.ckpt", "--format=tflite"], {}, ["--format tflite", "onnx"]),
    ],
    ids=[
        "command",
        "flag_typo",
        "yaml_typo",
        "yaml_syntax",
        "missing_config",
        "type",
        "precision",
        "tta",
        "export_format",
    ],
)
def test_argument_errors_are_the_error_and_a_pointer_to_help(
    tmp_path, monkeypatch, capsys, args, files, words
):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        Path(name).write_text(text)
    code, err = fails(capsys, args)
    assert code == 2
    assert "usage:" not in err and "<unicode string>" not in err
    lines = err.splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 3, err
    assert re.fullmatch(
        r"Run `(python -m )?tlfinetune( \w+)? --help` for the options\.", lines[-1]
    ), err
    for word in words:
        assert word in err


def test_evaluating_without_a_checkpoint_warns_that_the_model_is_untrained(data, trained, data_log):
    runs = trained.parents[2]  # the fit's root: the warning names its last checkpoint
    args = [a for a in base(data, runs, command="test") if "max_epochs" not in a]
    main(args)
    warned = [r.getMessage() for r in data_log.records if r.levelname == "WARNING"]
    assert any(
        m.startswith("No --ckpt_path: test uses a model whose head was never trained")
        and f"e.g. --ckpt_path {trained}" in m
        for m in warned
    ), warned


def test_a_failed_fit_removes_the_folders_it_made_and_nothing_else(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "b" / "0.png").write_bytes((data / "b" / "0.png").read_bytes()[:100])  # truncated
    fresh = tmp_path / "fresh"
    code, _ = fails(capsys, base(bad, fresh))
    assert code == 2 and not fresh.exists()  # made by the command, left empty: gone
    kept = tmp_path / "kept"
    (kept / "version_0").mkdir(parents=True)  # an earlier run's (empty) folder stays
    code, _ = fails(capsys, base(bad, kept))
    assert code == 2 and sorted(p.name for p in kept.iterdir()) == ["version_0"]


def test_only_a_run_folder_without_results_is_removed(tmp_path):
    from tlfinetune.cli import remove_if_unused

    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.csv").write_text("epoch,step\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    remove_if_unused(run)
    assert (run / "checkpoints" / "last.ckpt").exists()  # a checkpoint keeps it all
    (run / "checkpoints" / "last.ckpt").unlink()
    remove_if_unused(run)
    assert not run.exists()


def test_testing_without_data_says_which_flags_give_it(trained, tmp_path, capsys):
    args = [*base(tmp_path / "unused", tmp_path / "runs", command="test"), f"--ckpt_path={trained}"]
    args.remove(f"--data.root={tmp_path / 'unused'}")
    code, err = fails(capsys, args)
    assert code == 2
    assert "No data to read" in err and "training" not in err  # not only fit reads data
    assert "--data.root demo" in err and "root: demo" not in err  # the flag, not YAML syntax


def test_a_csv_over_a_config_that_sets_root_says_how_to_unset_it(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  root: demo\n")  # as every file in configs/ does
    csv = tmp_path / "train.csv"
    csv.write_text("path,label\na.png,x\n")
    args = ["fit", f"--config={config}", f"--data.train_csv={csv}", "--model.weights=none"]
    code, err = fails(capsys, [*args, "--model.backbone=test_vgg16", *QUIET])
    assert code == 2
    assert "Both data.root (demo) and data.train_csv" in err and "--data.root null" in err
