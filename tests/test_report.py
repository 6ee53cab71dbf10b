import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from tiny import TinyData, tiny_tensors, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from tlfinetune import FreezeSchedule, TransferClassifier
from tlfinetune.report import (
    REPORT_FILES,
    EvalResult,
    EvaluationReport,
    LearningCurves,
    evaluate,
    format_report,
    plot_learning_curves,
    write_report,
)


def assert_png(path, size):
    """The file decodes as a PNG of ``size`` pixels with visible content (not one flat colour)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size, (image.format, image.size)
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.002, "the image looks blank"


class Lookup(nn.Module):
    """Logits from a table, row = the sample index written into each image's first pixel."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()] * self.scale


def lookup_data(n=10, num_classes=3, batch_size=4):
    logits = torch.randn(n, num_classes, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return logits, labels, DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def test_evaluate_keeps_the_most_confident_mistakes_only():
    logits, labels, loader = lookup_data(n=30)
    model = Lookup(logits).train()
    result = evaluate(model, loader, ["a", "b", "c"], max_mistakes=3)
    assert model.training  # mode restored
    probs = torch.softmax(logits, dim=1)
    assert torch.equal(result.confusion, multiclass_confusion_matrix(probs, labels, 3))
    confidence, preds = probs.max(dim=1)
    wrong = (preds != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:3]
    assert len(wrong) > 3 and len(result.mistakes) == 3
    assert [m.confidence for m in result.mistakes] == pytest.approx(confidence[worst].tolist())
    assert [(m.label, m.pred) for m in result.mistakes] == [
        (labels[i].item(), preds[i].item()) for i in worst
    ]
    assert [m.image[0, 0, 0].item() for m in result.mistakes] == worst.tolist()  # their images
    assert result.mistakes[0].image.dtype == torch.uint8


@pytest.mark.parametrize("num_classes", [3, 7])
def test_write_report_matches_torchmetrics(tmp_path, num_classes):
    names = [f"class {chr(97 + i)}" for i in range(num_classes)]
    model = TransferClassifier(
        backbone="test_vgg16",
        weights="none",
        num_classes=num_classes,
        image_size=32,
        class_names=names,
    )
    data = TinyData(n=28, num_classes=num_classes)
    result = evaluate(model, data.val_dataloader())
    metrics = write_report(result, tmp_path / "report", extra={"stage": "test"})

    x, y = tiny_tensors(28, 32, num_classes)
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x), dim=1)  # independently of evaluate()
    assert torch.equal(result.confusion, multiclass_confusion_matrix(probs, y, num_classes))
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved == metrics and saved["stage"] == "test" and saved["num_samples"] == 28
    c = num_classes
    assert saved["accuracy"] == pytest.approx(multiclass_accuracy(probs, y, c, average="micro"))
    assert saved["macro_f1"] == pytest.approx(multiclass_f1_score(probs, y, c, average="macro"))
    assert saved["balanced_accuracy"] == pytest.approx(
        multiclass_recall(probs, y, c, average="macro")
    )
    assert ("top5_accuracy" in saved) == (num_classes > 5)
    if num_classes > 5:
        top5 = multiclass_accuracy(probs, y, c, top_k=5, average="micro")
        assert saved["top5_accuracy"] == pytest.approx(top5)
    assert list(saved["per_class"]) == names
    columns = {
        "precision": multiclass_precision(probs, y, c, average=None),
        "recall": multiclass_recall(probs, y, c, average=None),
        "f1": multiclass_f1_score(probs, y, c, average=None),
        "support": torch.bincount(y, minlength=c),
    }
    for key, values in columns.items():
        assert [saved["per_class"][n][key] for n in names] == pytest.approx(values.tolist())
    assert saved["confusion_matrix"] == multiclass_confusion_matrix(probs, y, c).tolist()

    side = {3: 500, 7: 615}[num_classes]
    assert_png(tmp_path / "report" / "confusion_matrix.png", (side, side))
    k = len(result.mistakes)
    assert k == min(16, int((probs.argmax(1) != y).sum()))
    cols, rows = min(4, k), -(-k // 4)
    assert_png(tmp_path / "report" / "mistakes.png", (260 * cols, 290 * rows))

    text = format_report(metrics)
    assert all(n in text for n in names) and ("top-5" in text) == (num_classes > 5)


def test_no_mistakes_still_gives_an_image(tmp_path):
    labels = torch.tensor([0, 1, 2, 1])
    result = EvalResult.from_probs(torch.eye(3)[labels], labels, ["x", "y", "z"])
    metrics = write_report(result, tmp_path)
    assert metrics["accuracy"] == 1.0 and metrics["per_class"]["y"]["support"] == 2
    assert_png(tmp_path / "mistakes.png", (600, 200))
    assert_png(tmp_path / "confusion_matrix.png", (500, 500))


def test_learning_curves_record_epochs_and_milestones_across_a_resume(tmp_path):
    def fit(epochs, folder, ckpt_path=None):
        model = TransferClassifier(
            backbone="test_vgg16", weights="none", num_classes=3, image_size=32
        )
        curves = LearningCurves(dirpath=str(tmp_path / folder))
        t = trainer(epochs, callbacks=[FreezeSchedule(milestones={1: "block5"}), curves])
        t.fit(model, TinyData(), ckpt_path=ckpt_path)
        return t, curves

    t, first = fit(2, "first")
    keys = {"epoch", "train/loss", "train/acc", "val/loss", "val/acc", "trainable_params"}
    assert [h["epoch"] for h in first.history] == [0, 1]
    assert all(set(h) == keys for h in first.history)
    assert first.history[1]["trainable_params"] > first.history[0]["trainable_params"]
    assert first.milestones == {1: "unfreeze block5+"}
    assert_png(tmp_path / "first" / "learning_curves.png", (1100, 420))

    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed = fit(3, "resumed", ckpt_path=tmp_path / "epoch1.ckpt")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history[:2] == first.history
    assert resumed.milestones == {1: "unfreeze block5+"}
    saved = json.loads((tmp_path / "resumed" / "learning_curves.json").read_text())
    assert saved["history"] == resumed.history and saved["milestones"] == {"1": "unfreeze block5+"}
    assert_png(tmp_path / "resumed" / "learning_curves.png", (1100, 420))


def test_plot_learning_curves_draws_milestones_and_copes_with_gaps():
    history = [{"epoch": 0, "train/loss": 1.0}, {"epoch": 1, "train/loss": 0.5, "val/loss": 0.7}]
    fig = plot_learning_curves(history, {1: "unfreeze block5+"})
    assert isinstance(fig, Figure)
    loss, acc = fig.axes
    assert [line.get_label() for line in loss.lines[:2]] == ["train/loss", "val/loss"]
    assert any(list(line.get_xdata()) == [0.5, 0.5] for line in acc.lines)  # the milestone
    assert isinstance(plot_learning_curves([]), Figure)


def test_evaluation_report_runs_at_validate_and_test_not_during_fit(tmp_path, capsys):
    data = TinyData()
    model = TransferClassifier(backbone="test_vgg16", weights="none", num_classes=3, image_size=32)
    report = EvaluationReport()
    t = trainer(1, callbacks=[report], default_root_dir=tmp_path)
    t.fit(model, data)
    assert not list(tmp_path.glob("*_report"))

    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    for stage in ("validate", "test"):
        getattr(t, stage)(model, data)
        folder = tmp_path / f"{stage}_report"
        metrics = json.loads((folder / "metrics.json").read_text())
        logged = t.callback_metrics[f"{'val' if stage == 'validate' else 'test'}/acc"]
        assert metrics["stage"] == stage and metrics["num_samples"] == 24
        assert metrics["accuracy"] == pytest.approx(logged.item())  # the loop's own predictions
        assert list(metrics["per_class"]) == ["c0", "c1", "c2"]  # names from the datamodule
        assert report.metrics[0] == metrics
        assert_png(folder / "confusion_matrix.png", (500, 500))
        assert (folder / "mistakes.png").is_file()
    assert len(calls) == 2 * 3  # one forward per batch: no second pass over the data
    assert "test report" in capsys.readouterr().out

    # A second test keeps the first report; the new one's files share the number 1.
    folder = tmp_path / "test_report"
    earlier = {p.name: p.read_bytes() for p in folder.iterdir()}
    t.test(model, data)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*REPORT_FILES, "metrics.1.json", "confusion_matrix.1.png", "mistakes.1.png"]
    )
    assert {name: (folder / name).read_bytes() for name in earlier} == earlier
    assert json.loads((folder / "metrics.1.json").read_text()) == report.metrics[0]


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # see conftest.py
def test_evaluation_report_gathers_predictions_from_all_processes(ddp_runs):
    out = ddp_runs / "report"  # tests/ddp_worker.py: Trainer.test of 26 images on 2 processes
    logged = json.loads((out / "logged.json").read_text())
    metrics = json.loads((out / "test_report" / "metrics.json").read_text())
    assert metrics["num_samples"] == 26
    assert metrics["accuracy"] == pytest.approx(logged["test/acc"])
    assert sum(map(sum, metrics["confusion_matrix"])) == 26
    assert_png(out / "test_report" / "confusion_matrix.png", (500, 500))


def test_a_second_report_keeps_the_first_and_numbers_all_its_files(tmp_path, data_log):
    logits, labels, _ = lookup_data()
    result = EvalResult.from_probs(torch.softmax(logits, dim=1), labels, ["a", "b", "c"])
    write_report(result, tmp_path, {"run": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_report(result, tmp_path, {"run": 2})
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    assert json.loads((tmp_path / "metrics.1.json").read_text())["run"] == 2
    assert_png(tmp_path / "confusion_matrix.1.png", (500, 500))
    assert (tmp_path / "mistakes.1.png").is_file()
    assert (
        f"Report written to {tmp_path / 'metrics.1.json'}, confusion_matrix.1.png and "
        "mistakes.1.png; the earlier report files there are kept." in data_log.text
    )
    # What is left of an earlier set still takes its number: the next set shares number 3.
    (tmp_path / "mistakes.2.png").write_bytes(b"someone's")
    write_report(result, tmp_path, {"run": 3})
    assert json.loads((tmp_path / "metrics.3.json").read_text())["run"] == 3
    assert (tmp_path / "confusion_matrix.3.png").is_file() and (
        tmp_path / "mistakes.3.png"
    ).is_file()
    assert not (tmp_path / "metrics.2.json").exists()
    assert (tmp_path / "mistakes.2.png").read_bytes() == b"someone's"


class TwoLoaders(pl.LightningModule):
    """Logits from a table (row = first pixel), tested on several dataloaders."""

    def __init__(self, logits):
        super().__init__()
        self.save_hyperparameters({"num_classes": logits.shape[1]})
        self.lookup = Lookup(logits)

    def forward(self, x):
        return self.lookup(x)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self(batch[0])


def test_one_number_for_the_report_folders_of_one_run(tmp_path):
    logits, _, loader = lookup_data()
    # An earlier file in any dataloader's folder moves the whole run to the next number.
    (tmp_path / "dataloader_1").mkdir()
    (tmp_path / "dataloader_1" / "mistakes.png").write_bytes(b"earlier")
    report = EvaluationReport(dirpath=str(tmp_path), verbose=False, heat_maps=False)
    trainer(callbacks=[report]).test(TwoLoaders(logits), [loader, loader], verbose=False)
    for folder in ("dataloader_0", "dataloader_1"):
        names = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert names[:3] == ["confusion_matrix.1.png", "metrics.1.json", "mistakes.1.png"]
    assert not (tmp_path / "dataloader_0" / "metrics.json").exists()
    assert (tmp_path / "dataloader_1" / "mistakes.png").read_bytes() == b"earlier"
