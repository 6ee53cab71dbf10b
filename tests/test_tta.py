"""Test-time augmentation: the numbers, the files that say it was on, the command line."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_cli import FAST, make_folder
from tiny import saved_checkpoint, tiny_tensors, trainer
from torch.utils.data import DataLoader, TensorDataset

from tlfinetune import ImageDataModule, TransferClassifier
from tlfinetune.cli import main
from tlfinetune.errors import ConfigError
from tlfinetune.predict import PredictionWriter
from tlfinetune.report import EvaluationReport
from tlfinetune.tta import TestTimeAugmentation


def two_passes(model, images):
    """The reference: softmax of the images and of their mirror images, averaged."""
    model.eval()
    with torch.no_grad():
        return (F.softmax(model(images), 1) + F.softmax(model(images.flip(-1)), 1)) / 2


def test_flip_averages_the_softmax_of_the_two_passes(tmp_path, one_thread):
    torch.manual_seed(0)
    model = TransferClassifier(num_classes=3, image_size=32, backbone="test_vgg16",
                               weights="none", class_names=["a", "b", "c"])  # fmt: skip
    x, y = tiny_tensors(12, 32)
    expected = two_passes(model, x)
    with torch.no_grad():
        plain = F.softmax(model(x), 1)
        model.tta = "flip"
        averaged = F.softmax(model(x), 1)
        model.train()
        training = F.softmax(model(x), 1)  # training never sees it
        model.tta = "none"
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert (averaged - plain).abs().max() > 1e-3  # the mirror image does change the answer
    assert torch.allclose(training, plain, atol=1e-6)

    # predict: the CSV holds the averaged probabilities and says how they were made.
    loader = DataLoader(TensorDataset(x, torch.arange(12)), batch_size=5)
    writer = PredictionWriter(output=str(tmp_path / "p.csv"), top_k=3, tta="flip")
    trainer(callbacks=[writer]).predict(model, loader, return_predictions=False)
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tta"] for r in rows] == ["flip"] * 12
    top = expected.max(dim=1)
    assert [float(r["probability"]) for r in rows] == pytest.approx(top.values.tolist(), abs=2e-6)
    assert [r["label"] for r in rows] == [["a", "b", "c"][i] for i in top.indices]
    assert model.tta == "none"  # for the run only

    # test: the logged loss and accuracy, and the report, are the averaged prediction's.
    report = EvaluationReport(dirpath=str(tmp_path / "report"), verbose=False)
    run = trainer(callbacks=[TestTimeAugmentation("flip"), report])
    logged = run.test(model, DataLoader(TensorDataset(x, y), batch_size=5), verbose=False)[0]
    assert logged["test/loss"] == pytest.approx(F.nll_loss(expected.log(), y).item(), abs=1e-5)
    accuracy = (expected.argmax(1) == y).float().mean().item()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["tta"] == "flip" and metrics["accuracy"] == pytest.approx(accuracy)
    assert logged["test/acc"] == pytest.approx(accuracy)
    assert model.tta == "none"

    with pytest.raises(ConfigError, match="flip"):
        PredictionWriter(tta="crops")


@pytest.mark.slow
def test_predict_and_test_with_tta_from_the_command_line(tmp_path, capsys, one_thread):
    data = make_folder(tmp_path / "data", per_class=3, size=32)
    dm = ImageDataModule(root=data, image_size=32, batch_size=8, num_workers=0, val_split=0.34)
    ckpt = tmp_path / "model.ckpt"
    model = saved_checkpoint(ckpt, dm, max_steps=2)

    out = tmp_path / "pred"
    done = subprocess.run(
        [sys.executable, "-m", "tlfinetune", "predict", f"--ckpt_path={ckpt}",
         f"--data.predict_dir={data}", "--prediction.tta=flip",
         f"--trainer.default_root_dir={out}", "--trainer.precision=32-true", *FAST],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test-time augmentation: flip" in done.stdout
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    predict = ImageDataModule(predict_dir=data, image_size=32, batch_size=64, num_workers=0)
    predict.setup("predict")
    images = next(iter(predict.predict_dataloader()))[0]
    expected = two_passes(model, images).max(dim=1).values
    assert [r["path"] for r in rows] == [str(p) for p in predict.predict_files]
    assert [r["tta"] for r in rows] == ["flip"] * len(expected)
    assert [float(r["probability"]) for r in rows] == pytest.approx(expected.tolist(), abs=2e-6)

    # validate/test take the same flag (the Trainer run of the first test shows what it does).
    with pytest.raises(SystemExit):
        main(["test", f"--ckpt_path={ckpt}", "--prediction.tta=flip", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["prediction"] == {"tta": "flip"}
