"""The backbone_lr_ratio study (benchmarks/lr_ratio.py) runs end to end on a tiny setting."""

import logging

import lr_ratio  # benchmarks/, on the path through conftest.py
import pytest


@pytest.fixture
def quiet_loggers_restored():
    """The study quiets Lightning's and tlfinetune's loggers for its run: undo that afterwards
    (pytest restores the warning filters it also sets)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "tlfinetune")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.slow
def test_study_pretrains_folds_batchnorm_and_sweeps(tmp_path, quiet_loggers_restored):
    # The script's own entry point, in this process: a fresh interpreter would spend ~5 s of
    # this test's ~11 importing what this one has imported already.
    out = tmp_path / "lr_ratio.md"
    tiny = "--seeds 1 --epochs 1 --source_epochs 1 --source_per_class 4 --target_per_class 2"
    lr_ratio.main([*tiny.split(), "--val_per_class", "2", "--ratios", "1.0,0.1",
                   "--regimes", "partial", "--out", str(out)])  # fmt: skip
    text = out.read_text()
    # The fold is checked inside the script: the plain vgg16 must match the trained vgg16_bn.
    assert "BatchNorm folded into a plain vgg16 state dict" in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "| frozen, random-init backbone",
        "| frozen (head only)",
        "| partial, backbone_lr_ratio 1",
        "| partial, backbone_lr_ratio 0.1",
    ]
