"""The backbone_lr_ratio study (benchmarks/lr_ratio.py) runs end to end on a tiny setting."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lr_ratio.py"


@pytest.mark.slow
def test_study_pretrains_folds_batchnorm_and_sweeps(tmp_path):
    out = tmp_path / "lr_ratio.md"
    tiny = "--seeds 1 --epochs 1 --source_epochs 1 --source_per_class 4 --target_per_class 2"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *tiny.split(), "--val_per_class", "2",
         "--ratios", "1.0,0.1", "--regimes", "partial", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
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
