"""`python -m tlfinetune compare`: one row per regime, the same budget, files written."""

import csv

import pytest
from PIL import Image

from tlfinetune.compare import COLUMNS, compare
from tlfinetune.errors import ConfigError


@pytest.mark.slow
def test_compare_covers_every_regime_asked(tmp_path):
    rows = compare([
        "--data.root=demo", "--data.image_size=32", "--model.backbone=test_vgg16",
        "--model.weights=none",
        "--regimes", "frozen,partial,full", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--data.num_workers=0",
    ])  # fmt: skip
    assert [r["regime"] for r in rows] == ["frozen", "partial", "full"]
    trainable = [r["trainable_params"] for r in rows]
    assert trainable[0] < trainable[1] < trainable[2]
    # frozen: the whole backbone (test_vgg16 has 57,828 parameters where vgg16 has 14,714,688)
    assert rows[2]["frozen_params"] == 0 and rows[0]["frozen_params"] == 57_828
    with open(tmp_path / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and len(table) == 3
    assert "| frozen |" in (tmp_path / "comparison.md").read_text()
    with Image.open(tmp_path / "comparison.png") as image:
        assert image.size[0] > 500


def test_unknown_regime_is_refused():
    with pytest.raises(ConfigError, match="frozen, partial, full"):
        compare(["--regimes=frozen,sometimes"])
