"""``python -m tlfinetune`` under DDP (2 CPU processes, gloo), as a user runs it.

Every artifact is written once, by rank 0, complete; every image is counted once although the
image counts are odd (a padding sampler would repeat one); a milestone unfreezes layers that
both ranks then train identically.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]  # see conftest.py

DDP = (
    "--trainer.strategy=ddp",
    "--trainer.devices=2",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
)
# VGG16's layout at 1/16 of its channels: DDP and the CLI are the point, not the network's size.
MODEL = ("--model.weights=none", "--model.backbone=test_vgg16", "--data.image_size=32")
COUNTS = {"train": (4, 4, 4), "val": (2, 2, 1), "test": (3, 2, 2)}  # val 5, test 7: odd


def make_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, counts in COUNTS.items():
        for channel, (name, n) in enumerate(zip(("red", "green", "blue"), counts, strict=True)):
            for i in range(n):
                pixels = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
                pixels[..., channel] += 100
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)


def tlfinetune(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    here = Path(__file__).parent
    path = os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tlfinetune", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_fit_with_a_milestone_then_test_and_predict_under_ddp(tmp_path):
    make_images(tmp_path / "data")
    probe = {"class_path": "ddp_probe.RankWeights", "init_args": {"folder": "ranks"}}
    fit = tlfinetune(
        tmp_path, "fit", *MODEL, *DDP, "--data.root=data", "--data.batch_size=4",
        "--trainer.max_epochs=2", "--freeze.regime=partial", "--freeze.unfreeze_from=block5",
        "--freeze.milestones={1: block4}", f"--trainer.callbacks+={json.dumps(probe)}",
    )  # fmt: skip
    assert fit.stdout.count("Best val/acc") == 1  # the summary, printed once
    for line in (
        "the fastest that keeps accuracy",
        "TransferClassifier: backbone",
        "Epoch 1: unfreezing",
    ):
        assert fit.stderr.count(line) == 1, line  # log lines once, not once per process
    assert "run folder: runs/version_0" in fit.stdout
    run = tmp_path / "runs" / "version_0"
    written = files_under(tmp_path / "runs")
    best = [f for f in written if f.startswith("version_0/checkpoints/best-")]
    assert len(best) == 1, written
    assert written == sorted(
        [
            *best,
            "version_0/checkpoints/last.ckpt",
            "version_0/config.yaml",
            "version_0/hparams.yaml",
            "version_0/learning_curves.json",
            "version_0/learning_curves.png",
            "version_0/metrics.csv",
        ]
    )  # one version folder, each file once: no config.1.yaml, no version_1, no temporary files
    with open(run / "metrics.csv", newline="") as f:
        epochs = [r["epoch"] for r in csv.DictReader(f) if r.get("val/acc")]
    assert epochs == ["0", "1"]  # one row per epoch, not one per rank
    curves = json.loads((run / "learning_curves.json").read_text())
    assert [h["epoch"] for h in curves["history"]] == [0, 1] and curves["milestones"] == {
        "1": "unfreeze block4+"
    }

    # The milestone through the command line: vgg11's block4 (convs 11, 13) unfrozen at epoch 1,
    # after DDP wrapped the model, is all-reduced; blocks 1-3 stay bit-identical on both ranks.
    r0, r1 = (torch.load(tmp_path / "ranks" / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    trained = {
        f"{i}.{p}" for i in (17, 19, 21, 24, 26, 28) for p in ("weight", "bias")
    }  # blocks 4-5
    for r in (r0, r1):
        changed = {k for k, v in r["final"].items() if not torch.equal(v, r["init"][k])}
        assert changed == trained
    for key in r0["final"]:
        assert torch.equal(r0["init"][key], r1["init"][key]), key
        assert torch.equal(r0["final"][key], r1["final"][key]), key
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in r0["final"].items():
        assert torch.equal(saved[f"backbone.{key}"], value), key

    ckpt = "--ckpt_path=runs/version_0/checkpoints/last.ckpt"
    test = tlfinetune(
        tmp_path, "test", ckpt, *DDP, "--data.root=data", "--trainer.default_root_dir=ev"
    )
    assert test.stdout.count("test report") == 1
    assert files_under(tmp_path / "ev") == ["confusion_matrix.png", "metrics.json", "mistakes.png"]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_samples"] == 7 == sum(map(sum, metrics["confusion_matrix"]))
    assert [row["support"] for row in metrics["per_class"].values()] == [2, 2, 3]  # b, g, r
    logged = next(line for line in test.stdout.splitlines() if "test/acc" in line)
    assert float(logged.split()[-1]) == pytest.approx(metrics["accuracy"])  # the loop's: 7 too

    predict_dir = tmp_path / "data" / "test"
    predict = tlfinetune(
        tmp_path, "predict", ckpt, *DDP, f"--data.predict_dir={predict_dir}",
        "--trainer.default_root_dir=pred", "--prediction.top_k=2",
    )  # fmt: skip
    assert predict.stdout.count("Wrote 7 predictions") == 1
    assert files_under(tmp_path / "pred") == ["predictions.csv"]  # part files merged, removed
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label", "probability", "top1", "top1_probability", "top2",
                       "top2_probability"]  # fmt: skip
    images = sorted(str(p) for p in predict_dir.rglob("*.png"))
    assert sorted(r[0] for r in rows[1:]) == images  # every image exactly once


def test_validate_and_compare_under_ddp(tmp_path):
    make_images(tmp_path / "data")
    common = (*MODEL, *DDP, "--data.root=data", "--data.batch_size=4")
    compare = tlfinetune(
        tmp_path, "compare", "--regimes=frozen", *common, "--trainer.max_epochs=1",
        "--trainer.default_root_dir=cmp",
    )  # fmt: skip
    assert compare.stdout.count("Best val/acc") == 1
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["regime"] == "frozen" and row["epochs"] == "1"
    for name in ("comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).is_file()

    ckpt = "--ckpt_path=cmp/compare/frozen/version_0/checkpoints/last.ckpt"
    validate = tlfinetune(tmp_path, "validate", ckpt, *common, "--trainer.default_root_dir=ev")
    assert validate.stdout.count("validate report") == 1
    assert files_under(tmp_path / "ev") == ["confusion_matrix.png", "metrics.json", "mistakes.png"]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_samples"] == 5 == sum(map(sum, metrics["confusion_matrix"]))
