"""Issue 16's tools through the command line: a tracker, Mixup/CutMix, and heat maps."""

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import FAST, fit_args, make_folder

from tlfinetune.cli import main


@pytest.mark.slow
def test_tensorboard_mix_and_explain_from_the_command_line(tmp_path, data_log, one_thread):
    data, out, tb = make_folder(tmp_path / "data"), tmp_path / "runs", tmp_path / "tb"
    main(
        fit_args(
            data, out,
            "--trainer.logger=TensorBoardLogger", f"--trainer.logger.save_dir={tb}",
            "--data.mix=cutmix", "--data.cutmix_alpha=0.5", "--data.augment=false",
        )
    )  # fmt: skip

    # TensorBoard got the train and val metrics of both epochs...
    (events,) = tb.glob("lightning_logs/version_0/events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in scalars, scalars
    accumulator = EventAccumulator(str(events)).Reload()
    assert len(accumulator.Scalars("val/acc")) == 2
    # ...and the run folder is tlfinetune's as without it: checkpoints, metrics.csv, curves.
    version = out / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    assert last.is_file() and (version / "metrics.csv").is_file()
    assert (version / "learning_curves.png").is_file()
    curves = json.loads((version / "learning_curves.json").read_text())["history"]
    assert [sorted(k for k in h if "/" in k) for h in curves] == [
        ["train/acc", "train/loss", "val/acc", "val/loss"]
    ] * 2
    # Mixed batches: the feature cache said it is off (once), although augment is false.
    assert data_log.text.count("Feature cache off: training batches are mixed") == 1

    images, heat = tmp_path / "new", tmp_path / "heat"
    make_folder(images, classes=("x", "y/deeper"), per_class=2, size=50)
    main(
        [
            "predict", f"--ckpt_path={last}", f"--data.predict_dir={images}",
            f"--trainer.default_root_dir={tmp_path / 'pred'}", f"--prediction.explain={heat}",
            *FAST,
        ]
    )  # fmt: skip
    with open(tmp_path / "pred" / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    written = sorted(str(p.relative_to(heat)) for p in heat.rglob("*.png"))
    assert written == ["x/000.png", "x/001.png", "y/deeper/000.png", "y/deeper/001.png"]
